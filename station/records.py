"""Item records in SQLite: one row per item, the evidence reports are built on.

Writes go through one writer thread and are committed in small batches (`batch_s`), so the loop
never waits on a disk flush. WAL mode lets the HMI, reports and the plant publisher read while the
station writes.

Durability — what "acknowledged" means
--------------------------------------
An item record is *acknowledged* once the writer thread's COMMIT containing it has returned. Only
then does the writer publish it: `Records.durable_item_id` (and `durable_event_id`,
`durable_alarm_id`) become the highest row id committed. Row ids are assigned in commit order by one
writer, so every item with id <= `durable_item_id` is on disk. The status line of `kozan run` and the
HMI show this number; nothing is ever shown or published as done before it is durable.

`synchronous` (records.synchronous) is FULL by default: in WAL mode SQLite then fsyncs the WAL at
every commit, so an acknowledged record survives kill -9 *and* power loss. With NORMAL a commit
survives a killed process but the last commits before a power cut may roll back (the WAL is fsynced
only at checkpoints). The writer commits at most every `batch_s` (0.2 s), so FULL costs at most five
fsyncs a second, nothing the loop ever waits on: there is no reason to take the risk.

Append-only tables, for anyone tailing them by row id (the plant publisher)
---------------------------------------------------------------------------
`items`, `item_events` and `alarms` use AUTOINCREMENT ids: rows are only appended, ids only grow and
are never reused, even after `kozan records archive` moved old rows out. An item's decision columns
never change; its outcome columns (`outcome`, `outcome_s`, `fired_count`) are a convenience copy of
its newest `item_events` row (append-only history: acked, fired, nak:<reason>, timeout, ...).

Lots (station.lots): the writer attaches each item to the lot that was open when it was decided and
appends the item and its events to that lot's hash chain in the same transaction.
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
from typing import Any, Callable

from station import lots as lots_mod

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    mode TEXT NOT NULL,               -- 'line' | 'sim-realtime' | 'sim-fast'
    model_version TEXT NOT NULL,
    config_json TEXT NOT NULL,
    summary_json TEXT
);
CREATE TABLE IF NOT EXISTS lots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    lot_number TEXT NOT NULL UNIQUE,
    origin_country TEXT NOT NULL,     -- ISO 3166-1 alpha-2
    supplier TEXT NOT NULL,
    consignment_ref TEXT NOT NULL,
    basel_ref TEXT NOT NULL,          -- Basel Convention notification number, '' if none
    opened_at TEXT NOT NULL,
    opened_by TEXT NOT NULL,
    closed_at TEXT,
    closed_by TEXT,
    sealed_at TEXT,
    sealed_head TEXT,                 -- chain head when the close had drained the lot's outcomes
    sealed_records INTEGER,
    genesis_hash TEXT NOT NULL,       -- link 0: SHA-256 over the header above
    head_hash TEXT NOT NULL,          -- newest link
    records INTEGER NOT NULL          -- links on the chain
);
CREATE UNIQUE INDEX IF NOT EXISTS lots_one_open ON lots((closed_at IS NULL)) WHERE closed_at IS NULL;
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    track_id INTEGER NOT NULL,
    decided_at TEXT NOT NULL,         -- wall clock, UTC ISO 8601 (milliseconds)
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
    decision_outcome TEXT NOT NULL,   -- manual | sent | missed, as decided (never changes)
    outcome TEXT NOT NULL,            -- newest: manual | sent | acked | fired | missed | nak:<reason> | timeout | lost_in_reset
    outcome_s REAL,
    fired_count INTEGER,
    model_version TEXT NOT NULL,
    u_mm REAL, y_mm REAL, length_mm REAL, width_mm REAL,
    lot_id INTEGER REFERENCES lots(id),
    lot_seq INTEGER,                  -- position on the lot's chain
    chain_hash TEXT,                  -- the lot chain's link for this row
    UNIQUE (run_id, track_id)
);
CREATE INDEX IF NOT EXISTS items_run ON items(run_id);
CREATE INDEX IF NOT EXISTS items_command ON items(run_id, command_id);
CREATE INDEX IF NOT EXISTS items_decided ON items(decided_at);
CREATE INDEX IF NOT EXISTS items_lot ON items(lot_id, lot_seq);
CREATE TABLE IF NOT EXISTS item_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id INTEGER NOT NULL REFERENCES items(id),
    run_id INTEGER NOT NULL,
    at TEXT NOT NULL,
    outcome TEXT NOT NULL,
    t_s REAL NOT NULL,
    fired_count INTEGER,
    lot_id INTEGER REFERENCES lots(id),
    lot_seq INTEGER,
    chain_hash TEXT
);
CREATE INDEX IF NOT EXISTS item_events_item ON item_events(item_id);
CREATE INDEX IF NOT EXISTS item_events_lot ON item_events(lot_id, lot_seq);
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER,
    lot_id INTEGER,
    at TEXT NOT NULL,
    t_s REAL NOT NULL,
    code TEXT NOT NULL,
    severity TEXT NOT NULL,
    message TEXT NOT NULL,
    track_id INTEGER
);
CREATE INDEX IF NOT EXISTS alarms_at ON alarms(at);
"""
SCHEMA = TABLES   # kept for readers of the old name


def open_db(path: str | Path, synchronous: str = "FULL", create: bool = True) -> sqlite3.Connection:
    """A connection with the station's pragmas and the current schema (migrating an old file)."""
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ValueError(f"records.synchronous={synchronous!r}: one of FULL, NORMAL, EXTRA")
    if str(path) != ":memory:":
        p = Path(path)
        if not create and not p.exists():
            raise FileNotFoundError(f"{p}: no records database here (check records.path or --records)")
        p.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=30000")
    _ensure_schema(db)
    return db


def _ensure_schema(db: sqlite3.Connection) -> None:
    have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "items" in have:
        cols = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        if "lot_id" not in cols:
            _migrate_v1(db)
            return
    if "lots" in have and "meta" in have:
        v = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if v and int(v[0]) >= SCHEMA_VERSION:
            return
    db.execute("BEGIN IMMEDIATE")
    for stmt in _statements(TABLES):
        db.execute(stmt)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    db.execute("COMMIT")


def _statements(script: str) -> list[str]:
    out, cur = [], []
    for line in script.splitlines():
        line = line.split("--")[0].rstrip()
        if not line:
            continue
        cur.append(line)
        if line.endswith(";"):
            out.append("\n".join(cur))
            cur = []
    return out


def _migrate_v1(db: sqlite3.Connection) -> None:
    """Schema 1 (no lots, ids reusable) -> 2: rebuild the tables, keeping every row and id."""
    log.warning("records: migrating the database from schema 1 to %d (rows and ids are kept)", SCHEMA_VERSION)
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE items RENAME TO items_v1")
        db.execute("ALTER TABLE runs RENAME TO runs_v1")
        db.execute("DROP INDEX IF EXISTS items_run")
        db.execute("DROP INDEX IF EXISTS items_command")
        for stmt in _statements(TABLES):
            db.execute(stmt)
        db.execute("INSERT INTO runs SELECT * FROM runs_v1")
        cols = [r[1] for r in db.execute("PRAGMA table_info(items_v1)")]
        db.execute(f"INSERT INTO items ({', '.join(cols)}, decision_outcome) "
                   f"SELECT {', '.join(cols)}, outcome FROM items_v1")
        db.execute("DROP TABLE items_v1")
        db.execute("DROP TABLE runs_v1")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    finally:
        db.execute("PRAGMA foreign_keys=ON")


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


_ITEM_INSERT = ("INSERT INTO items (run_id, track_id, decided_at, first_seen_s, decided_s, class_name, confidence,"
                " votes_json, views, bin, diverter_id, reason, command_id, fire_count, decision_outcome, outcome,"
                " model_version, u_mm, y_mm, length_mm, width_mm, lot_id)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


class Records:
    def __init__(self, path: str | Path, batch_s: float = 0.2, synchronous: str = "FULL"):
        self.path = Path(path)
        self._q: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._batch_s = batch_s
        self._db = open_db(path, synchronous)
        self.run_id: int | None = None
        self._pending = 0
        self._drained = threading.Condition()
        self._error: BaseException | None = None
        self.failed_rows = 0
        # published by the writer after each COMMIT has returned (see the module docstring)
        self.durable_item_id = int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0])
        self.durable_event_id = int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM item_events").fetchone()[0])
        self.durable_alarm_id = int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM alarms").fetchone()[0])
        self.durable_items = 0              # items this process has had acknowledged
        self.durable_at: str | None = None
        self.on_durable: list[Callable[[int], None]] = []   # called with durable_item_id after each commit
        self._thread = threading.Thread(target=self._writer, name="records-writer", daemon=True)
        self._thread.start()

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
        self._put(("item", self.run_id, _utc_now(), r))

    def item_outcome(self, command_id: int, outcome: str, t_s: float, fired_count: int | None = None) -> None:
        self._put(("outcome", self.run_id, _utc_now(), command_id, outcome, t_s, fired_count))

    def alarm_raised(self, alarm: Any, item_id: int | None = None) -> None:
        """AlarmBoard listener: every raise (repeats included) becomes one `alarms` row."""
        sev = getattr(alarm.severity, "value", str(alarm.severity))
        self._put(("alarm", self.run_id, _utc_now(), float(alarm.last_s), alarm.code, sev, alarm.message, item_id))

    def _put(self, op: tuple[Any, ...]) -> None:
        if self._error is not None:
            raise RuntimeError(f"records writer failed: {self._error}") from self._error
        with self._drained:
            self._pending += 1
        self._q.put(op)

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
                for op in batch:
                    try:
                        self._commit([op])
                    except sqlite3.Error as e1:
                        self.failed_rows += 1
                        log.error("records: %s row dropped: %s (%s)", op[0], e1, _op_id(op))
                    except Exception as e1:
                        self._error = e1
                        log.exception("records writer failed")
            except Exception as e:  # the disk is gone or the file is broken: tell the loop
                self._error = e
                log.exception("records writer failed")
            with self._drained:
                self._pending -= len(batch)
                self._drained.notify_all()

    def _commit(self, batch: list[tuple[Any, ...]]) -> None:
        db = self._db
        heads: dict[int, list[Any]] = {}     # lot id -> [head hash, links] while this transaction runs
        max_item = max_event = max_alarm = 0
        n_items = 0
        try:
            db.execute("BEGIN IMMEDIATE")
            for op in batch:
                kind = op[0]
                if kind == "item":
                    iid = self._insert_item(op, heads)
                    max_item = max(max_item, iid)
                    n_items += 1
                elif kind == "outcome":
                    eid = self._insert_outcome(op, heads)
                    max_event = max(max_event, eid)
                elif kind == "alarm":
                    _, run_id, at, t_s, code, sev, message, track_id = op
                    lot = db.execute("SELECT id FROM lots WHERE closed_at IS NULL").fetchone()
                    c = db.execute("INSERT INTO alarms (run_id, lot_id, at, t_s, code, severity, message, track_id)"
                                   " VALUES (?,?,?,?,?,?,?,?)",
                                   (run_id, lot[0] if lot else None, at, t_s, code, sev, message, track_id))
                    max_alarm = max(max_alarm, int(c.lastrowid))
            for lot_id, (head, n) in heads.items():
                db.execute("UPDATE lots SET head_hash=?, records=? WHERE id=?", (head, n, lot_id))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # durable from here on: publish
        if max_item:
            self.durable_item_id = max(self.durable_item_id, max_item)
            self.durable_items += n_items
        if max_event:
            self.durable_event_id = max(self.durable_event_id, max_event)
        if max_alarm:
            self.durable_alarm_id = max(self.durable_alarm_id, max_alarm)
        self.durable_at = _utc_now()
        if max_item:
            for cb in list(self.on_durable):
                try:
                    cb(self.durable_item_id)
                except Exception:
                    log.exception("records: durable listener failed (ignored)")

    def _chain(self, heads: dict[int, list[Any]], lot_id: int, table: str, row_id: int) -> None:
        db = self._db
        if lot_id not in heads:
            h, n = db.execute("SELECT head_hash, records FROM lots WHERE id=?", (lot_id,)).fetchone()
            heads[lot_id] = [h, n]
        head, n = heads[lot_id]
        db.execute(f"UPDATE {table} SET lot_seq=? WHERE id=?", (n + 1, row_id))
        cur = db.cursor()
        cur.row_factory = sqlite3.Row
        row = dict(cur.execute(f"SELECT * FROM {table} WHERE id=?", (row_id,)).fetchone())
        h = lots_mod.link(head, table, row)
        db.execute(f"UPDATE {table} SET chain_hash=? WHERE id=?", (h, row_id))
        heads[lot_id] = [h, n + 1]

    def _insert_item(self, op: tuple[Any, ...], heads: dict[int, list[Any]]) -> int:
        _, run_id, decided_at, r = op
        db = self._db
        lot = db.execute("SELECT id FROM lots WHERE opened_at <= ? AND (closed_at IS NULL OR closed_at > ?) "
                         "ORDER BY id DESC LIMIT 1", (decided_at, decided_at)).fetchone()
        lot_id = lot[0] if lot else None
        c = db.execute(_ITEM_INSERT, (
            run_id, r.track_id, decided_at, r.first_seen_s, r.decided_s, r.class_name, r.confidence,
            json.dumps(r.votes, sort_keys=True), r.views, r.bin, r.diverter_id, r.reason, r.command_id,
            r.fire_count, r.outcome, r.outcome, r.model_version, r.u_mm, r.y_mm, r.length_mm, r.width_mm, lot_id))
        iid = int(c.lastrowid)
        if lot_id is not None:
            self._chain(heads, lot_id, "items", iid)
        return iid

    def _insert_outcome(self, op: tuple[Any, ...], heads: dict[int, list[Any]]) -> int:
        _, run_id, at, command_id, outcome, t_s, fired_count = op
        db = self._db
        it = db.execute("SELECT id, lot_id FROM items WHERE run_id=? AND command_id=?",
                        (run_id, command_id)).fetchone()
        if it is None:
            raise sqlite3.IntegrityError(f"outcome {outcome} for command {command_id} of run {run_id}: no such item")
        item_id, lot_id = it
        db.execute("UPDATE items SET outcome=?, outcome_s=?, fired_count=COALESCE(?, fired_count) WHERE id=?",
                   (outcome, t_s, fired_count, item_id))
        c = db.execute("INSERT INTO item_events (item_id, run_id, at, outcome, t_s, fired_count, lot_id)"
                       " VALUES (?,?,?,?,?,?,?)", (item_id, run_id, at, outcome, t_s, fired_count, lot_id))
        eid = int(c.lastrowid)
        if lot_id is not None:
            self._chain(heads, lot_id, "item_events", eid)
        return eid

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything handed over is committed."""
        with self._drained:
            if not self._drained.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError(f"records: writer did not drain within {timeout}s")

    def acknowledged(self) -> dict[str, Any]:
        """What is durable: the HMI and the status line show this."""
        return {"item_id": self.durable_item_id, "event_id": self.durable_event_id,
                "alarm_id": self.durable_alarm_id, "items_this_run": self.durable_items, "at": self.durable_at,
                "pending": self._pending}

    def close(self) -> None:
        self.flush()
        self._q.put(None)
        self._thread.join(timeout=5)
        self._db.close()

    # -- lots (synchronous, on a connection of their own; see station.lots) -----------------------
    def open_lot(self, info: "lots_mod.LotInfo") -> dict[str, Any]:
        self.flush()
        db = open_db(self.path)
        try:
            return lots_mod.open_lot(db, info)
        finally:
            db.close()

    def close_lot(self, closed_by: str = "station", drain_s: float = 5.0) -> dict[str, Any]:
        self.flush()
        db = open_db(self.path)
        try:
            return lots_mod.close_lot(db, None, closed_by, drain_s=drain_s)
        finally:
            db.close()

    def current_lot(self) -> dict[str, Any] | None:
        db = open_db(self.path)
        try:
            return lots_mod.current_lot(db)
        finally:
            db.close()

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


def _op_id(op: tuple[Any, ...]) -> str:
    if op[0] == "item":
        return f"item {op[3].track_id}"
    if op[0] == "outcome":
        return f"command {op[3]}"
    return f"alarm {op[4]}"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


