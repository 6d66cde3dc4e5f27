"""`kozan plant`: the plant aggregator (MQTT -> PostgreSQL). See docs/PLANT.md."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def cmd_plant(a: argparse.Namespace) -> int:
    from station.plant.aggregator import Aggregator, parse_hostport

    try:
        host, port = parse_hostport(a.mqtt)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dsn = a.db or os.environ.get("KOZAN_PLANT_DB", "")
    if not dsn:
        print("error: give the database with --db postgresql://user@host/dbname (or KOZAN_PLANT_DB)",
              file=sys.stderr)
        return 2
    logging.getLogger("station.plant").setLevel(logging.INFO)
    agg = Aggregator(host, port, dsn, client_id=a.client_id, username=a.username or "",
                     password=os.environ.get("KOZAN_MQTT_PASSWORD", ""))

    def on_signal(signum, frame):
        agg.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        agg.run()
    except Exception as e:  # the database at start: say what to fix
        print(f"error: plant aggregator could not start: {e}", file=sys.stderr)
        return 1
    print(f"plant aggregator stopped: {agg.stored} items stored, {agg.repeats} repeats ignored, "
          f"{agg.bad} unreadable", flush=True)
    return 0


def add_plant_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plant", help="plant aggregator: every station's items from MQTT into PostgreSQL")
    p.add_argument("--mqtt", default="127.0.0.1:1883", help="broker HOST:PORT (default 127.0.0.1:1883)")
    p.add_argument("--db", default=None, help="PostgreSQL URL, e.g. postgresql://kozan@dbhost/plant "
                                              "(default: $KOZAN_PLANT_DB)")
    p.add_argument("--client-id", default="kozan-plant",
                   help="MQTT client id; the broker keeps this session's messages while it is down")
    p.add_argument("--username", default=None, help="broker user (password from $KOZAN_MQTT_PASSWORD)")
    p.set_defaults(func=cmd_plant)
