"""Item records in SQLite: one row per item, the evidence reports are built on.

Writes go through one writer thread and are committed in small batches, so the loop never waits
on a disk flush; `flush()` is the point at which everything handed over is durable. WAL mode lets
the HMI and reports read while the station writes.
"""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    mode TEXT NOT NULL,               -- 'line' | 'sim-realtime' | 'sim-fast'
    model_version TEXT NOT NULL,
    config_json TEXT NOT NULL,
    summary_json TEXT
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    track_id INTEGER NOT NULL,
    decided_at TEXT NOT NULL,         -- wall clock, UTC ISO 8601
    first_seen_s REAL NOT NULL,       -- station clock (monotonic or virtual seconds)
    decided_s REAL NOT NULL,
    class_name TEXT NOT NULL,
    confidence REAL NOT NULL,
    votes_json TEXT NOT NULL,
    views INTEGER NOT NULL,
    bin INTEGER NOT NULL,             -- 0 = manual / end of belt
    diverter_id INTEGER,
    reason TEXT NOT NULL,
    command_id INTEGER,
    fire_count INTEGER,
    outcome TEXT NOT NULL,            -- manual | sent | acked | fired | missed | nak:<reason>
    outcome_s REAL,
    fired_count INTEGER,
    model_version TEXT NOT NULL,
    u_mm REAL, y_mm REAL, length_mm REAL, width_mm REAL,
    UNIQUE (run_id, track_id)
);
CREATE INDEX IF NOT EXISTS items_run ON items(run_id);
CREATE INDEX IF NOT EXISTS items_command ON items(run_id, command_id);
"""


@dataclass
class ItemRecord:
    track_id: int
    first_seen_s: float
    decided_s: float
    class_name: str
    confidence: float
    votes: dict[str, float]
    views: int
    bin: int
    diverter_id: int | None
    reason: str
    command_id: int | None
    fire_count: int | None
    outcome: str
    model_version: str
    u_mm: float
    y_mm: float
    length_mm: float
    width_mm: float


class Records:
    def __init__(self, path: str | Path, batch_s: float = 0.2):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._q: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._batch_s = batch_s
        self._db = self._connect()
        self._db.executescript(SCHEMA)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        self._db.commit()
        self.run_id: int | None = None
        self._pending = 0
        self._drained = threading.Condition()
        self._error: BaseException | None = None
        self.failed_rows = 0
        self._thread = threading.Thread(target=self._writer, name="records-writer", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("BEGIN")
        db.execute("COMMIT")
        return db

    # -- run lifecycle (synchronous: rare, and the id is needed at once) --------------------------
    def start_run(self, mode: str, model_version: str, config: dict[str, Any]) -> int:
        self.flush()
        cur = self._db.execute(
            "INSERT INTO runs (started_at, mode, model_version, config_json) VALUES (?, ?, ?, ?)",
            (_utc_now(), mode, model_version, json.dumps(config, sort_keys=True)))
        self.run_id = int(cur.lastrowid)
        return self.run_id

    def end_run(self, summary: dict[str, Any]) -> None:
        self.flush()
        self._db.execute("UPDATE runs SET ended_at=?, summary_json=? WHERE id=?",
                         (_utc_now(), json.dumps(summary, sort_keys=True), self.run_id))

    # -- item writes (queued) ---------------------------------------------------------------------
    def item_decided(self, r: ItemRecord) -> None:
        if self.run_id is None:
            raise RuntimeError("start_run() before recording items")
        self._put("INSERT INTO items (run_id, track_id, decided_at, first_seen_s, decided_s, class_name, confidence,"
                  " votes_json, views, bin, diverter_id, reason, command_id, fire_count, outcome, model_version,"
                  " u_mm, y_mm, length_mm, width_mm) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                  (self.run_id, r.track_id, _utc_now(), r.first_seen_s, r.decided_s, r.class_name, r.confidence,
                   json.dumps(r.votes, sort_keys=True), r.views, r.bin, r.diverter_id, r.reason, r.command_id,
                   r.fire_count, r.outcome, r.model_version, r.u_mm, r.y_mm, r.length_mm, r.width_mm))

    def item_outcome(self, command_id: int, outcome: str, t_s: float, fired_count: int | None = None) -> None:
        self._put("UPDATE items SET outcome=?, outcome_s=?, fired_count=COALESCE(?, fired_count)"
                  " WHERE run_id=? AND command_id=?", (outcome, t_s, fired_count, self.run_id, command_id))

    def _put(self, sql: str, args: tuple[Any, ...]) -> None:
        if self._error is not None:
            raise RuntimeError(f"records writer failed: {self._error}") from self._error
        with self._drained:
            self._pending += 1
        self._q.put((sql, args))

    def _writer(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self._batch_s
            while time.monotonic() < deadline:
                try:
                    nxt = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
            try:
                self._commit(batch)
            except sqlite3.Error as e:
                # one bad row must not take the good ones with it: retry them one by one
                log.error("records: batch of %d rows failed (%s); writing them one by one", len(batch), e)
                for row in batch:
                    try:
                        self._commit([row])
                    except sqlite3.Error as e1:
                        self.failed_rows += 1
                        log.error("records: row dropped: %s (%s)", e1, row[0].split("(")[0].strip())
            except Exception as e:  # the disk is gone or the file is broken: tell the loop
                self._error = e
                log.exception("records writer failed")
            with self._drained:
                self._pending -= len(batch)
                self._drained.notify_all()

    def _commit(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        try:
            self._db.execute("BEGIN")
            for sql, args in batch:
                self._db.execute(sql, args)
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything handed over is committed."""
        with self._drained:
            if not self._drained.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError(f"records: writer did not drain within {timeout}s")

    def close(self) -> None:
        self.flush()
        self._q.put(None)
        self._thread.join(timeout=5)
        self._db.close()

    # -- reads ------------------------------------------------------------------------------------
    def items(self, run_id: int | None = None) -> list[dict[str, Any]]:
        self.flush()
        db = sqlite3.connect(str(self.path))
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute("SELECT * FROM items WHERE run_id=? ORDER BY id", (run_id or self.run_id,)).fetchall()
            return [dict(r) for r in rows]
        finally:
            db.close()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
