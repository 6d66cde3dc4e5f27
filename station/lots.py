"""Lots: a consignment sorted as one, and the hash chain that makes its records tamper-evident.

A lot is opened (lot number, origin country, supplier, consignment or Basel notification reference)
and later closed. An item belongs to the lot that was open when it was *decided* (its `decided_at`
lies in the lot's [opened_at, closed_at) window); the records writer attaches it when it commits the
row, inside the same SQLite transaction that appends it to the lot's chain.

The chain (one per lot):

    link 0  genesis = SHA-256("kozan-lot-v1\\n" + canonical(lot header))
    link k  hash_k  = SHA-256(hash_{k-1} + "\\n" + canonical(record k))

A record is an item row (its decision: every column except the outcome columns that the diverter's
answers update later) or an item event (an outcome the diverter reported: acked, fired, NAK, ...).
`canonical` is compact JSON with sorted keys of the row exactly as SQLite returns it, so anyone can
recompute a chain from the database with nothing but `sqlite3`, `json` and `hashlib`. The lot row keeps
the head (newest hash) and the number of links; each record keeps its own link hash and position.

`verify_lot` recomputes everything and names each row that no longer matches, each position that
is missing (a deleted row) and each row that claims the lot without being on its chain.

Lot operations take a write lock (`BEGIN IMMEDIATE`) on the database, so a lot opened from the
command line while a station is writing is seen by the station's next commit (at most
`records.batch_s` later) and no item is ever appended to the wrong lot.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

CHAIN_VERSION = "kozan-lot-v1"
LOT_HEADER_COLS = ("id", "lot_number", "origin_country", "supplier", "consignment_ref", "basel_ref",
                   "opened_at", "opened_by")
# the outcome columns of `items` change as the diverter answers: their history is chained as item_events
ITEM_MUTABLE_COLS = ("outcome", "outcome_s", "fired_count", "chain_hash")
EVENT_UNCHAINED_COLS = ("chain_hash",)
LOT_NUMBER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,63}$")
COUNTRY_RE = re.compile(r"^[A-Z]{2}$")


class LotError(ValueError):
    """A lot operation that cannot be done; the message says why and what to do."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def canonical(table: str, row: dict[str, Any], skip: Iterable[str] = ()) -> bytes:
    skip = set(skip)
    body = {k: v for k, v in row.items() if k not in skip}
    return json.dumps([table, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def link(prev_hex: str, table: str, row: dict[str, Any]) -> str:
    skip = ITEM_MUTABLE_COLS if table == "items" else EVENT_UNCHAINED_COLS
    return hashlib.sha256(prev_hex.encode("ascii") + b"\n" + canonical(table, row, skip)).hexdigest()


def genesis(header: dict[str, Any]) -> str:
    h = {k: header[k] for k in LOT_HEADER_COLS}
    return hashlib.sha256(CHAIN_VERSION.encode() + b"\n" + canonical("lots", h)).hexdigest()


@dataclass
class LotInfo:
    lot_number: str
    origin_country: str
    supplier: str
    consignment_ref: str = ""
    basel_ref: str = ""
    opened_by: str = "cli"

    def validate(self) -> "LotInfo":
        self.lot_number = self.lot_number.strip()
        self.origin_country = self.origin_country.strip().upper()
        self.supplier = self.supplier.strip()
        self.consignment_ref = (self.consignment_ref or "").strip()
        self.basel_ref = (self.basel_ref or "").strip()
        if not LOT_NUMBER_RE.match(self.lot_number):
            raise LotError(f"lot number {self.lot_number!r}: use 1-64 letters, digits, '.', '_', '/', '-' "
                           "(starting with a letter or digit)")
        if not COUNTRY_RE.match(self.origin_country):
            raise LotError(f"origin country {self.origin_country!r}: give the ISO 3166-1 alpha-2 code "
                           "(e.g. JP, DE, NG)")
        if not self.supplier:
            raise LotError("supplier: name the supplier the consignment came from")
        if not (self.consignment_ref or self.basel_ref):
            raise LotError("give a consignment reference or a Basel notification reference (or both)")
        return self


def _connect(path: str) -> sqlite3.Connection:
    from station.records import open_db   # the schema lives there

    return open_db(path)


def current_lot(db: sqlite3.Connection) -> dict[str, Any] | None:
    db.row_factory = sqlite3.Row
    r = db.execute("SELECT * FROM lots WHERE closed_at IS NULL ORDER BY id DESC LIMIT 1").fetchone()
    return dict(r) if r else None


def get_lot(db: sqlite3.Connection, lot_number: str) -> dict[str, Any] | None:
    db.row_factory = sqlite3.Row
    r = db.execute("SELECT * FROM lots WHERE lot_number=?", (lot_number,)).fetchone()
    return dict(r) if r else None


def list_lots(db: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM lots ORDER BY id DESC LIMIT ?", (limit,))]


def open_lot(db: sqlite3.Connection, info: LotInfo) -> dict[str, Any]:
    """Open a lot; refused while another is open (close it first) or if the number was used."""
    info.validate()
    db.execute("BEGIN IMMEDIATE")
    try:
        cur = current_lot(db)
        if cur is not None:
            raise LotError(f"lot {cur['lot_number']} is still open (since {cur['opened_at']}): close it first")
        if get_lot(db, info.lot_number) is not None:
            raise LotError(f"lot number {info.lot_number} was used before: lot numbers are unique")
        now = utc_now()
        c = db.execute("INSERT INTO lots (lot_number, origin_country, supplier, consignment_ref, basel_ref, "
                       "opened_at, opened_by, genesis_hash, head_hash, records) VALUES (?,?,?,?,?,?,?,'','',0)",
                       (info.lot_number, info.origin_country, info.supplier, info.consignment_ref, info.basel_ref,
                        now, info.opened_by))
        lot_id = int(c.lastrowid)
        header = dict(db.execute("SELECT * FROM lots WHERE id=?", (lot_id,)).fetchone())
        g = genesis(header)
        db.execute("UPDATE lots SET genesis_hash=?, head_hash=? WHERE id=?", (g, g, lot_id))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return get_lot(db, info.lot_number)  # type: ignore[return-value]


def close_lot(db: sqlite3.Connection, lot_number: str | None = None, closed_by: str = "cli",
              drain_s: float = 5.0, settle_s: float = 0.5) -> dict[str, Any]:
    """Close the open lot (or the one named), then wait for its items' diverter outcomes.

    Items decided before the close still reach the database up to one writer batch later, and an
    item's fired/NAK answer arrives when the belt has carried it to its diverter. The close waits
    until no item of the lot awaits an answer and `settle_s` has passed (at most `drain_s`), then
    seals: the head at that moment is kept as `sealed_head`. Anything chained later (a very late
    answer) still extends the chain and shows on the report as chained after the seal.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        lot = current_lot(db) if lot_number is None else get_lot(db, lot_number)
        if lot is None:
            raise LotError("no lot is open" if lot_number is None else f"no lot {lot_number}")
        if lot["closed_at"] is not None:
            raise LotError(f"lot {lot['lot_number']} was closed at {lot['closed_at']}")
        db.execute("UPDATE lots SET closed_at=?, closed_by=? WHERE id=?", (utc_now(), closed_by, lot["id"]))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    t_settle = time.monotonic() + settle_s
    t_end = time.monotonic() + max(drain_s, settle_s)
    while time.monotonic() < t_end:
        waiting = db.execute("SELECT COUNT(*) FROM items WHERE lot_id=? AND outcome IN ('sent','acked')",
                             (lot["id"],)).fetchone()[0]
        if waiting == 0 and time.monotonic() >= t_settle:
            break
        time.sleep(0.05)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("UPDATE lots SET sealed_at=?, sealed_head=head_hash, sealed_records=records WHERE id=?",
                   (utc_now(), lot["id"]))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return get_lot(db, lot["lot_number"])  # type: ignore[return-value]


# ---- verification ------------------------------------------------------------------------------
@dataclass
class Verification:
    lot_number: str
    records: int = 0
    head: str = ""
    stored_head: str = ""
    problems: list[str] = field(default_factory=list)
    broken_rows: list[dict[str, Any]] = field(default_factory=list)
    head_matches_link: int | None = None     # which link a given printed head is, when asked

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"lot": self.lot_number, "ok": self.ok, "records": self.records, "head": self.head,
                "stored_head": self.stored_head, "problems": self.problems, "broken_rows": self.broken_rows,
                "head_matches_link": self.head_matches_link}


def _describe(table: str, row: dict[str, Any]) -> str:
    if table == "items":
        return (f"items row id={row['id']} (lot link {row['lot_seq']}, run {row['run_id']}, track {row['track_id']}, "
                f"{row['class_name']} -> bin {row['bin']}, decided {row['decided_at']})")
    return (f"item_events row id={row['id']} (lot link {row['lot_seq']}, item {row['item_id']}, "
            f"outcome {row['outcome']}, at {row['at']})")


def verify_lot(dbs: list[sqlite3.Connection], lot_number: str, printed_head: str | None = None) -> Verification:
    """Recompute a lot's chain from its rows in `dbs` (the live database first, then archives)."""
    v = Verification(lot_number)
    lot = None
    for db in dbs:
        lot = get_lot(db, lot_number)
        if lot is not None:
            break
    if lot is None:
        v.problems.append(f"no lot {lot_number} in the records or their archives")
        return v
    v.stored_head = lot["head_hash"]
    g = genesis(lot)
    if g != lot["genesis_hash"]:
        v.problems.append(f"the lot header (number, origin, supplier, references, opened at/by) was edited: "
                          f"its genesis hash is {g[:16]}…, the chain starts from {lot['genesis_hash'][:16]}…")
    recs: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    unchained: list[str] = []
    seen_ids: set[tuple[str, int]] = set()
    items: dict[int, dict[str, Any]] = {}
    events: dict[int, list[dict[str, Any]]] = {}
    for db in dbs:
        db.row_factory = sqlite3.Row
        for table in ("items", "item_events"):
            for r in db.execute(f"SELECT * FROM {table} WHERE lot_id=? ORDER BY id", (lot["id"],)):
                row = dict(r)
                if (table, row["id"]) in seen_ids:      # the same row in the live db and an archive
                    continue
                seen_ids.add((table, row["id"]))
                if row["lot_seq"] is None:
                    unchained.append(f"{table} row id={row['id']} claims lot {lot_number} but is not on its chain "
                                     "(inserted or moved into the lot by hand)")
                    continue
                recs.setdefault(row["lot_seq"], []).append((table, row))
                if table == "items":
                    items[row["id"]] = row
                else:
                    events.setdefault(row["item_id"], []).append(row)
    v.problems.extend(unchained)
    n = max(recs) if recs else 0
    n = max(n, lot["records"] or 0)
    prev_stored: str | None = lot["genesis_hash"]
    for seq in range(1, n + 1):
        entries = recs.get(seq)
        if not entries:
            v.problems.append(f"lot link {seq} is missing: a record of this lot was deleted")
            v.broken_rows.append({"lot_seq": seq, "table": None, "id": None, "why": "missing"})
            prev_stored = None          # the next link's predecessor is gone: it cannot be checked alone
            continue
        if len(entries) > 1:
            v.problems.append(f"lot link {seq} appears {len(entries)} times: "
                              + "; ".join(_describe(t, r) for t, r in entries))
        table, row = entries[0]
        if prev_stored is not None and link(prev_stored, table, row) != row["chain_hash"]:
            v.problems.append(f"{_describe(table, row)} was edited after it was written: its content no longer "
                              f"matches its link hash")
            v.broken_rows.append({"lot_seq": seq, "table": table, "id": row["id"], "why": "content edited"})
        prev_stored = row["chain_hash"] or ""
        if printed_head and row["chain_hash"] == printed_head:
            v.head_matches_link = seq
    v.records = n
    v.head = prev_stored or ""
    if v.head != lot["head_hash"]:
        v.problems.append(f"the lot's stored head {lot['head_hash'][:16]}… is not the last link "
                          f"{v.head[:16]}… ({lot['records']} links stored, {n} found)")
    # the outcome columns of an item must be what its chained events say
    for iid, row in items.items():
        evs = sorted(events.get(iid, []), key=lambda e: e["lot_seq"] or 0)
        want = (evs[-1]["outcome"], evs[-1]["t_s"]) if evs else (row["decision_outcome"], None)
        if (row["outcome"], row["outcome_s"]) != want:
            v.problems.append(f"{_describe('items', row)}: outcome {row['outcome']!r} at {row['outcome_s']} is not "
                              f"what its chained history says ({want[0]!r} at {want[1]})")
            v.broken_rows.append({"lot_seq": row["lot_seq"], "table": "items", "id": iid, "why": "outcome edited"})
    if printed_head is not None:
        if printed_head == lot["genesis_hash"]:
            v.head_matches_link = 0
        if v.head_matches_link is None:
            v.problems.append(f"the given head {printed_head[:16]}… is not any link of this lot's chain: the "
                              "records were rewritten after that report was printed (or the head is mistyped)")
    return v
