"""Topics and payloads of the plant link (version 1). docs/PLANT.md is the reference.

    kozan/v1/<station>/items     one message per item row, QoS 1, not retained
    kozan/v1/<station>/counters  counts of the current run, QoS 1, retained
    kozan/v1/<station>/health    online / offline (the will), QoS 1, retained
    kozan/v1/<station>/confirm   the plant aggregator's "stored through item id N", QoS 1, retained

Payloads are UTF-8 JSON objects, each with `v` (payload version, 1) and `station`.
"""
from __future__ import annotations

import json
import re
from typing import Any

ROOT = "kozan/v1"
PAYLOAD_VERSION = 1
_STATION_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

# the item row's columns, in the order they travel (station/records.py's `items` table)
ITEM_FIELDS = ("id", "run_id", "track_id", "decided_at", "first_seen_s", "decided_s", "class_name", "confidence",
               "votes_json", "views", "bin", "diverter_id", "reason", "command_id", "fire_count", "outcome",
               "outcome_s", "fired_count", "model_version", "u_mm", "y_mm", "length_mm", "width_mm",
               # records schema 2 (null from a schema-1 station): the decision as made, the lot and its chain
               "decision_outcome", "lot_id", "lot_seq", "chain_hash")

# outcomes that can still change after the row is written (the MCU has not answered yet)
PROVISIONAL_OUTCOMES = frozenset({"sent", "acked"})


def check_station_id(station: str) -> str:
    if not _STATION_RE.match(station or ""):
        raise ValueError(f"station id {station!r}: use 1-64 letters, digits, '_', '.' or '-' "
                         "(it becomes an MQTT topic level)")
    return station


def topic(station: str, kind: str) -> str:
    return f"{ROOT}/{station}/{kind}"


def parse_topic(t: str) -> tuple[str, str] | None:
    """`kozan/v1/<station>/<kind>` -> (station, kind); None for anything else."""
    parts = t.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != ROOT or not _STATION_RE.match(parts[2]):
        return None
    return parts[2], parts[3]


def item_payload(station: str, row: dict[str, Any], prev_id: int) -> bytes:
    """One item row as it travels. `prev_id` is the id of the row published before it (0 for the
    first): the aggregator follows the chain to know it holds everything up to an id."""
    d = {"v": PAYLOAD_VERSION, "station": station, "prev_id": int(prev_id)}
    for k in ITEM_FIELDS:
        d[k] = row.get(k)
    d["votes"] = json.loads(d.pop("votes_json") or "{}")
    return json.dumps(d, separators=(",", ":")).encode()


def dumps(d: dict[str, Any]) -> bytes:
    return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()


def loads(b: bytes) -> dict[str, Any]:
    d = json.loads(b.decode("utf-8"))
    if not isinstance(d, dict):
        raise ValueError("payload is not a JSON object")
    return d
