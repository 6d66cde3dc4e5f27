"""`kozan report ...`, `kozan lot ...`, `kozan records ...`.

    kozan report shift [--at T] [--previous]      the shift now running (or at T, or the one before)
    kozan report day [--date D]                   a plant-local day
    kozan report range --from A --to B            any period (dates or date-times, plant-local)
    kozan report lot LOT                          a lot, with its chain head
    kozan report verify LOT [--head HEX]          recompute the lot's hash chain; exit 1 if broken
    kozan lot open --number N --origin CC --supplier S (--consignment REF | --basel REF)
    kozan lot close [LOT] | kozan lot current | kozan lot list
    kozan records archive --before DATE | --keep-days N
    kozan records status

All take --config/--set like `kozan run`, and --records PATH to point at another database.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any


def _cfg(a: argparse.Namespace) -> Any:
    from station.cli import _load

    return _load(a)


def _paths(a: argparse.Namespace) -> tuple[Any, Path, Path]:
    cfg = _cfg(a)
    db = Path(a.records) if a.records else cfg.resolve(cfg.records.path)
    arch = Path(a.archive_dir) if getattr(a, "archive_dir", None) else cfg.resolve(cfg.records.archive_dir)
    return cfg, db, arch


def _stem(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_")


def cmd_report(a: argparse.Namespace) -> int:
    from station.reporting.build import (Composition, ReportError, build_report, day_period, range_period,
                                         shift_period)
    from station.reporting.render import PdfUnavailable, write_all
    from station.reporting.store import Store

    cfg, db, arch = _paths(a)
    rc = cfg.records.reports
    try:
        if a.kind == "verify":
            return _verify(db, arch, a)
        comp = Composition.load(cfg.resolve(a.composition or rc.composition))
        period = None
        if a.kind == "shift":
            period = shift_period(rc.timezone, rc.shifts, a.at, a.previous)
            stem = f"shift-{period.start:%Y%m%d-%H%M}"
        elif a.kind == "day":
            period = day_period(rc.timezone, a.date)
            stem = f"day-{period.label}"
        elif a.kind == "range":
            period = range_period(rc.timezone, a.frm, a.to)
            stem = f"range-{period.start:%Y%m%d-%H%M}-{period.end:%Y%m%d-%H%M}"
        else:
            stem = f"lot-{_stem(a.lot)}"
        with Store(db, arch) as store:
            rep = build_report(store, comp, period, lot_number=a.lot if a.kind == "lot" else None)
    except (ReportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.print:
        print(json.dumps(rep, indent=1, ensure_ascii=False))
        return 0
    out = Path(a.out) if a.out else cfg.resolve(rc.dir)
    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    try:
        written = write_all(rep, out, stem, formats, rc.chromium)
    except PdfUnavailable as e:
        written = write_all(rep, out, stem, [f for f in formats if f != "pdf"], rc.chromium)
        print(f"warning: no PDF: {e}", file=sys.stderr)
    t = rep["totals"]
    print(f"{rep['title']}: {t['items']} items, {t['mass_kg']:.1f} kg estimated, {t['manual']} manual, "
          f"{t['missed_or_failed']} missed/failed")
    if "lot" in rep:
        v = rep["lot"]["verification"]
        print(f"chain head {rep['lot']['head_hash']} ({rep['lot']['records']} links, "
              f"{'verified' if v['ok'] else 'BROKEN'})")
    for f, p in written.items():
        print(f"  {f}: {p}")
    return 0


def _verify(db: Path, arch: Path, a: argparse.Namespace) -> int:
    from station.lots import verify_lot
    from station.reporting.store import Store

    with Store(db, arch) as store:
        v = verify_lot(list(store.each()), a.lot, printed_head=a.head)
    if a.json:
        print(json.dumps(v.as_dict(), indent=1))
    elif v.ok:
        extra = ""
        if a.head and v.head_matches_link is not None and v.head_matches_link != v.records:
            extra = f"; the given head is link {v.head_matches_link}: {v.records - v.head_matches_link} records chained since"
        print(f"lot {a.lot}: chain intact, {v.records} links, head {v.head}{extra}")
    else:
        print(f"lot {a.lot}: CHAIN BROKEN ({len(v.problems)} problem(s)):")
        for p in v.problems:
            print(f"  - {p}")
    return 0 if v.ok else 1


def cmd_lot(a: argparse.Namespace) -> int:
    from station import lots
    from station.records import open_db

    cfg, dbp, _ = _paths(a)
    db = open_db(dbp)
    try:
        if a.action == "open":
            lot = lots.open_lot(db, lots.LotInfo(a.number, a.origin, a.supplier, a.consignment or "", a.basel or "",
                                                 a.by))
            print(f"lot {lot['lot_number']} open since {lot['opened_at']}: every item sorted from now on belongs to it")
        elif a.action == "close":
            lot = lots.close_lot(db, a.lot, a.by, drain_s=cfg.records.lot_close_drain_s if a.drain is None else a.drain)
            print(f"lot {lot['lot_number']} closed at {lot['closed_at']}: {lot['records']} records, "
                  f"head {lot['head_hash']}")
        elif a.action == "current":
            lot = lots.current_lot(db)
            if lot is None:
                print("no lot is open")
                return 1
            print(json.dumps(lot, indent=1))
        else:
            for lot in lots.list_lots(db, a.limit):
                print(f"{lot['lot_number']:<20} {lot['origin_country']}  {lot['supplier'][:24]:<24} "
                      f"{lot['opened_at']} -> {lot['closed_at'] or 'open':<29} {lot['records']:6d} records")
    except lots.LotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        db.close()
    return 0


def cmd_records(a: argparse.Namespace) -> int:
    from station.records import open_db
    from station.reporting.archive import archive

    cfg, dbp, arch = _paths(a)
    if a.action == "archive":
        if bool(a.before) == (a.keep_days is not None):
            print("error: give --before DATE or --keep-days N", file=sys.stderr)
            return 2
        before = a.before or (datetime.now(timezone.utc) - timedelta(days=a.keep_days)).isoformat()
        from station.plant.outbox import default_outbox_path, plant_confirmed_id

        keep = None
        if not a.ignore_plant:
            m = cfg.plant.mqtt
            outbox = cfg.resolve(m.outbox_path) if m.outbox_path else default_outbox_path(dbp)
            keep = plant_confirmed_id(outbox, dbp)
            if keep is None and m.enabled:
                keep = 0                   # publishing is on but has no cursor yet: the plant has nothing
            if keep is not None:
                print(f"plant: archiving only items the plant has confirmed (up to #{keep}; "
                      "--ignore-plant to archive regardless)", file=sys.stderr)
        try:
            res = archive(dbp, arch, before, keep_after_id=keep)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(res))
        return 0
    db = open_db(dbp, create=False)
    try:
        out = {"path": str(dbp), "journal_mode": db.execute("PRAGMA journal_mode").fetchone()[0],
               "integrity": db.execute("PRAGMA quick_check").fetchone()[0]}
        for t in ("runs", "lots", "items", "item_events", "alarms"):
            out[t] = db.execute(f"SELECT COUNT(*), COALESCE(MAX(id), 0) FROM {t}").fetchone()
        out["archives"] = [str(p) for p in sorted(arch.glob("kozan-archive-*.sqlite"))] if arch.is_dir() else []
    finally:
        db.close()
    print(json.dumps(out, indent=1))
    return 0


def add_records_commands(sub: argparse._SubParsersAction) -> None:
    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", default=None, help="station YAML (default: the simulated line)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting")
        sp.add_argument("--records", default=None, help="records database (default: records.path)")
        sp.add_argument("--archive-dir", default=None, help="archives to read as well (default: records.archive_dir)")

    r = sub.add_parser("report", help="reports from the item records: shift, day, range, lot; verify a lot")
    rs = r.add_subparsers(dest="kind", required=True)
    for name, helptext in (("shift", "the shift running now (plant time)"), ("day", "one plant-local day"),
                           ("range", "any period"), ("lot", "one lot, with its chain head")):
        sp = rs.add_parser(name, help=helptext)
        common(sp)
        sp.add_argument("--out", default=None, help="output folder (default: records.reports.dir)")
        sp.add_argument("--format", default="json,csv,html,pdf", help="comma-separated: json,csv,html,pdf")
        sp.add_argument("--composition", default=None, help="mass/metal table (default: records.reports.composition)")
        sp.add_argument("--print", action="store_true", help="print the JSON to stdout instead of writing files")
        sp.set_defaults(func=cmd_report, lot=None)
        if name == "shift":
            sp.add_argument("--at", default=None, help="the shift containing this plant-local date-time")
            sp.add_argument("--previous", action="store_true", help="the shift before it")
        elif name == "day":
            sp.add_argument("--date", default=None, help="YYYY-MM-DD (default: today)")
        elif name == "range":
            sp.add_argument("--from", dest="frm", required=True)
            sp.add_argument("--to", required=True)
        else:
            sp.add_argument("lot", help="lot number")
    v = rs.add_parser("verify", help="recompute a lot's hash chain; names every row that breaks it")
    common(v)
    v.add_argument("lot", help="lot number")
    v.add_argument("--head", default=None, help="the chain head printed on a report, to check against")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_report)

    lp = sub.add_parser("lot", help="open, close and list lots")
    ls = lp.add_subparsers(dest="action", required=True)
    o = ls.add_parser("open", help="open a lot: every item sorted while it is open belongs to it")
    common(o)
    o.add_argument("--number", required=True, help="lot number (unique)")
    o.add_argument("--origin", required=True, help="origin country, ISO 3166-1 alpha-2 (JP, DE, ...)")
    o.add_argument("--supplier", required=True)
    o.add_argument("--consignment", default="", help="consignment reference")
    o.add_argument("--basel", default="", help="Basel Convention notification reference")
    o.add_argument("--by", default="cli", help="who opens it (kept on the lot)")
    c = ls.add_parser("close", help="close the open lot (or the one named)")
    common(c)
    c.add_argument("lot", nargs="?", default=None)
    c.add_argument("--by", default="cli")
    c.add_argument("--drain", type=float, default=None, help="seconds to wait for outstanding diverter outcomes")
    cur = ls.add_parser("current", help="the open lot, as JSON")
    common(cur)
    li = ls.add_parser("list", help="recent lots")
    common(li)
    li.add_argument("--limit", type=int, default=50)
    for sp in (o, c, cur, li):
        sp.set_defaults(func=cmd_lot)

    rp = sub.add_parser("records", help="records database: status, archive old rows")
    rsub = rp.add_subparsers(dest="action", required=True)
    ar = rsub.add_parser("archive", help="move rows older than a date to a dated archive database")
    common(ar)
    ar.add_argument("--before", default=None, help="date (YYYY-MM-DD, UTC midnight) or ISO date-time")
    ar.add_argument("--keep-days", type=float, default=None, help="archive what is older than this many days")
    ar.add_argument("--ignore-plant", action="store_true",
                    help="archive items the plant has not confirmed yet (they will never reach the plant)")
    st = rsub.add_parser("status", help="row counts, newest ids, journal mode, integrity")
    common(st)
    for sp in (ar, st):
        sp.set_defaults(func=cmd_records)
