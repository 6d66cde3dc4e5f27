"""The live records database and its archives, read as one.

Archives (`records.archive_dir/kozan-archive-<date>.sqlite`) have the same schema and keep every row's
id (ids are AUTOINCREMENT and never reused), so a row is the same row wherever it lies; should it lie
in two places (an archive interrupted between copy and delete), it is counted once.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Iterator

from station.records import open_db


def archive_paths(archive_dir: str | Path) -> list[Path]:
    d = Path(archive_dir)
    return sorted(d.glob("kozan-archive-*.sqlite")) if d.is_dir() else []


class Store:
    def __init__(self, path: str | Path, archive_dir: str | Path | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no records database (check records.path or --records)")
        self.archives = archive_paths(archive_dir) if archive_dir else []
        self.dbs: list[sqlite3.Connection] = [open_db(self.path)]
        for p in self.archives:
            db = sqlite3.connect(str(p), timeout=30.0)   # read only by use (a WAL file's readers need its -shm)
            self.dbs.append(db)
        for db in self.dbs:
            db.row_factory = sqlite3.Row

    def close(self) -> None:
        for db in self.dbs:
            db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """`sql` run on every database, rows merged by id (the live database wins), in id order."""
        out: dict[int, dict[str, Any]] = {}
        for db in self.dbs:
            for r in db.execute(sql, args):
                d = dict(r)
                out.setdefault(d["id"], d)
        return [out[k] for k in sorted(out)]

    def each(self) -> Iterator[sqlite3.Connection]:
        return iter(self.dbs)

    def lot(self, lot_number: str) -> dict[str, Any] | None:
        for db in self.dbs:
            r = db.execute("SELECT * FROM lots WHERE lot_number=?", (lot_number,)).fetchone()
            if r is not None:
                return dict(r)
        return None
