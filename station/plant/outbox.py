"""The publisher's durable cursor, in its own small SQLite file beside the records.

The station's records database is the outbox: nothing is copied out of it. This file only says how
far the publisher has got:

    acked_id      every item row up to this id was acknowledged by the broker (PUBACK)
    confirmed_id  the plant aggregator said it has stored every item up to this id (-1: never heard)

It lives apart from the records file so the records schema stays the records' own.
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursor (
    station TEXT NOT NULL,
    records TEXT NOT NULL,            -- the records file this cursor walks (resolved path)
    acked_id INTEGER NOT NULL,
    confirmed_id INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (station, records)
);
"""


def default_outbox_path(records_path: str | Path) -> Path:
    p = Path(records_path)
    return p.with_name(p.name + ".plant-outbox")


def plant_confirmed_id(outbox_path: str | Path, records_path: str | Path) -> int | None:
    """The highest item id the plant has confirmed for this records file (every station publishing
    it: the lowest of theirs); 0 when a cursor exists but nothing is confirmed; None without a cursor."""
    p = Path(outbox_path)
    if not p.exists():
        return None
    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT MIN(confirmed_id), COUNT(*) FROM cursor WHERE records=?",
                         (str(Path(records_path).resolve()),)).fetchone()
    except sqlite3.DatabaseError:
        return 0                            # unreadable: archive nothing the plant may still need
    finally:
        db.close()
    return None if not row or row[1] == 0 else max(int(row[0]), 0)


class OutboxCursor:
    def __init__(self, path: str | Path, station: str, records_path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = (station, str(Path(records_path).resolve()))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT acked_id, confirmed_id FROM cursor WHERE station=? AND records=?",
                               self._key).fetchone()
        self.acked_id, self.confirmed_id = (int(row[0]), int(row[1])) if row else (0, -1)

    def save(self, acked_id: int, confirmed_id: int) -> None:
        import time

        with self._lock:
            self._db.execute("INSERT INTO cursor VALUES (?, ?, ?, ?, ?) ON CONFLICT (station, records) DO UPDATE "
                             "SET acked_id=excluded.acked_id, confirmed_id=excluded.confirmed_id, "
                             "updated_at=excluded.updated_at",
                             (*self._key, int(acked_id), int(confirmed_id), time.time()))
            self.acked_id, self.confirmed_id = int(acked_id), int(confirmed_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
