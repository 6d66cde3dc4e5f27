"""`kozan report`, `kozan lot` and `kozan records`: reports, lots and archives built on the item records.

- `store`: reads the live records database and its archives as one (rows deduplicated by id)
- `build`: a report's figures for a period or a lot (counts, mass, metals, purity indicators, ...)
- `render`: the report as JSON, CSV, printable HTML with inline SVG charts, and PDF
- `archive`: moves old rows to dated archive databases
- `cli`: the commands
"""
