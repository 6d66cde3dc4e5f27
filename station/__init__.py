"""The controller: configuration, the loop, sorting rules, line state, records and the `kozan` CLI."""
