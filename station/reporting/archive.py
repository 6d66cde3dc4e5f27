"""Rotation: move old records to a dated archive database; reports read archives as well.

`archive(db_path, archive_dir, before)` moves, in this order and each step in one transaction:

1. copy into `kozan-archive-<before>.sqlite` (same schema): the lots closed before `before` with all
   their items, events and alarms (a lot's chain is never split between files), every item not in a
   lot decided before `before` with its events, the alarms raised before it, and the runs those rows
   name (copied; a run stays in the live database while it still has rows there);
2. delete exactly those rows from the live database.

A crash between 1 and 2 leaves rows in both files, never in neither; the next archive run and every
report count them once (same ids). Items of a lot still open, or closed after `before`, stay.

`keep_after_id`: items with a higher id stay too, and so does any lot holding one — the plant
publisher tails the live database by id, so a row archived before the plant confirmed it would never
reach the plant (`kozan records archive` passes the plant's confirmed id when plant publishing is set up).
The live database's ids keep growing (AUTOINCREMENT), so a reader tailing it by id misses nothing.
"""
from __future__ import annotations

import logging
import sqlite3
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from station.records import open_db

log = logging.getLogger(__name__)


def parse_before(s: str) -> str:
    """A date (YYYY-MM-DD, midnight UTC) or an ISO datetime -> the UTC ISO string rows compare to."""
    try:
        d = date.fromisoformat(s)
        dt = datetime(d.year, d.month, d.day, tzinfo=timezone.utc)
    except ValueError:
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"--before {s!r}: give a date (2026-01-31) or an ISO date-time") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def archive(db_path: str | Path, archive_dir: str | Path, before: str,
            keep_after_id: int | None = None) -> dict[str, Any]:
    cut = parse_before(before)
    keep = (1 << 62) if keep_after_id is None else int(keep_after_id)
    stamp = cut[:10]
    adir = Path(archive_dir)
    adir.mkdir(parents=True, exist_ok=True)
    apath = adir / f"kozan-archive-{stamp}.sqlite"
    open_db(apath).close()                        # the archive gets the same schema
    db = open_db(db_path)
    try:
        db.execute("ATTACH DATABASE ? AS arch", (str(apath),))
        sel_lots = ("SELECT id FROM lots WHERE closed_at IS NOT NULL AND closed_at < :cut AND NOT EXISTS "
                    "(SELECT 1 FROM items k WHERE k.lot_id = lots.id AND k.id > :keep)")
        sel_items = (f"SELECT id FROM items WHERE ((lot_id IN ({sel_lots})) "
                     "OR (lot_id IS NULL AND decided_at < :cut)) AND id <= :keep")
        sel_events = f"SELECT id FROM item_events WHERE item_id IN ({sel_items})"
        sel_alarms = f"SELECT id FROM alarms WHERE (lot_id IN ({sel_lots})) OR (lot_id IS NULL AND at < :cut)"
        p = {"cut": cut, "keep": keep}
        counts = {t: db.execute(f"SELECT COUNT(*) FROM ({q})", p).fetchone()[0]
                  for t, q in (("lots", sel_lots), ("items", sel_items), ("item_events", sel_events),
                               ("alarms", sel_alarms))}
        # 1. copy (the archive is its own file: this transaction covers it alone)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR IGNORE INTO arch.runs SELECT * FROM main.runs WHERE id IN "
                       f"(SELECT run_id FROM items WHERE id IN ({sel_items}) UNION "
                       f"SELECT run_id FROM alarms WHERE id IN ({sel_alarms}))", p)
            db.execute(f"INSERT OR IGNORE INTO arch.lots SELECT * FROM main.lots WHERE id IN ({sel_lots})", p)
            db.execute(f"INSERT OR IGNORE INTO arch.items SELECT * FROM main.items WHERE id IN ({sel_items})", p)
            db.execute("INSERT OR IGNORE INTO arch.item_events SELECT * FROM main.item_events "
                       f"WHERE id IN ({sel_events})", p)
            db.execute(f"INSERT OR IGNORE INTO arch.alarms SELECT * FROM main.alarms WHERE id IN ({sel_alarms})", p)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        # 2. delete from the live database what the archive now holds
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"DELETE FROM main.item_events WHERE id IN ({sel_events}) "
                       "AND id IN (SELECT id FROM arch.item_events)", p)
            db.execute(f"DELETE FROM main.alarms WHERE id IN ({sel_alarms}) AND id IN (SELECT id FROM arch.alarms)", p)
            # lots first need their ids gone from items: delete items, then the lots no row names
            lot_ids = [r[0] for r in db.execute(sel_lots, p)]
            db.execute(f"DELETE FROM main.items WHERE id IN ({sel_items}) AND id IN (SELECT id FROM arch.items)", p)
            for lid in lot_ids:
                db.execute("DELETE FROM main.lots WHERE id=? AND id IN (SELECT id FROM arch.lots) AND NOT EXISTS "
                           "(SELECT 1 FROM main.items WHERE lot_id=?)", (lid, lid))
            db.execute("DELETE FROM main.runs WHERE ended_at IS NOT NULL AND ended_at < ? AND id IN "
                       "(SELECT id FROM arch.runs) AND NOT EXISTS (SELECT 1 FROM main.items WHERE run_id=runs.id) "
                       "AND NOT EXISTS (SELECT 1 FROM main.alarms WHERE run_id=runs.id)", (cut,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("DETACH DATABASE arch")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    log.info("archived rows before %s to %s: %s", cut, apath, counts)
    return {"archive": str(apath), "before": cut, "moved": counts,
            **({"kept_for_plant_after_id": keep_after_id} if keep_after_id is not None else {})}
