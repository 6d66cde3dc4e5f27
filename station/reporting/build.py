"""A report's figures: what went where, how much it weighs, what metal it carries, how sure we are.

Periods are in the plant's time zone (`records.reports.timezone`): a `day` runs midnight to
midnight, a `shift` from one configured start (`records.reports.shifts`) to the next. A `lot` is
every item on the lot's chain. Items are selected by `decided_at` (UTC); everything is read from the
live database and its archives.

Where an item went (`delivered bin`): its bin when the diverter confirmed the firing, the manual path
(bin 0) when it was sent there or its command was missed, refused or lost; an item whose command was
sent but never confirmed is counted in its bin and reported as unconfirmed.

Purity indicators — the station has no ground truth on a real line, so these are indicators, not
measurements: the vote-weighted confidence of the items in a bin, the *expected foreign share*
(mean over the bin's items of 1 − the winning class's share of the item's votes: if the votes are
calibrated, the share of items that are not what they were sorted as), and the confirmed share
(diverter firings confirmed by the MCU). The simulated line's judged purity (`kozan sim`) is the
measurement they should be checked against.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from station.lots import verify_lot
from station.reporting.store import Store

DEFAULT_BIN_NAMES = {0: "manual / end of belt", 1: "Li-ion batteries", 2: "other batteries",
                     3: "high-grade boards", 4: "low-grade boards"}
FAILED_OUTCOMES = ("missed", "timeout", "lost_in_reset")
PRECIOUS = ("Au", "Ag", "Pd")


class ReportError(ValueError):
    pass


# ---- the composition table ---------------------------------------------------------------------
@dataclass
class Composition:
    path: str
    sha256: str
    classes: dict[str, dict[str, Any]]
    yields: dict[str, float]
    references: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Composition":
        p = Path(path)
        raw = p.read_bytes()
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ReportError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("classes"), dict):
            raise ReportError(f"{p}: expected a mapping with 'classes' (see station/composition.yaml)")
        for name, c in data["classes"].items():
            if not isinstance(c, dict) or not isinstance(c.get("mass_g"), (int, float)) or c["mass_g"] <= 0:
                raise ReportError(f"{p}: classes.{name}.mass_g must be a positive number of grams")
            for m, v in (c.get("metals") or {}).items():
                if not isinstance(v, dict) or not isinstance(v.get("g_per_t"), (int, float)) or v["g_per_t"] < 0:
                    raise ReportError(f"{p}: classes.{name}.metals.{m}.g_per_t must be a number >= 0")
        yields = {str(k): float(v) for k, v in (data.get("yield") or {}).items()}
        for m, y in yields.items():
            if not 0 <= y <= 1:
                raise ReportError(f"{p}: yield.{m}={y}: a share between 0 and 1")
        refs = data.get("sources")
        if isinstance(refs, dict):
            references = {str(k): " ".join(str(v).split()) for k, v in refs.items()}
        else:
            references = _comment_references(raw.decode("utf-8", "replace"))
        return cls(str(p), hashlib.sha256(raw).hexdigest(), data["classes"], yields, references)

    def sources(self, class_names: list[str]) -> dict[str, Any]:
        """Where each class's figures come from: per class, its metals grouped by the `source` they cite;
        and the table's references, key -> full citation (its `sources:` mapping, or the `# Sources`
        comment block of station/composition.yaml; the yields cite them too)."""
        per_class: dict[str, list[dict[str, Any]]] = {}
        for c in class_names:
            entry = self.classes.get(c)
            if not entry:
                continue
            groups: dict[str, list[str]] = {}
            for m, spec in (entry.get("metals") or {}).items():
                groups.setdefault(str(spec.get("source") or "no source given"), []).append(str(m))
            per_class[c] = [{"metals": ms, "source": src} for src, ms in groups.items()]
        return {"per_class": per_class, "references": dict(self.references)}

    def mass_g(self, cls_name: str) -> float | None:
        c = self.classes.get(cls_name)
        return float(c["mass_g"]) if c else None


def _comment_references(text: str) -> dict[str, str]:
    """`#  [KEY]  citation` entries (continued on deeper-indented comment lines) under a `# Sources` line."""
    refs: dict[str, str] = {}
    key = None
    in_block = False
    for line in text.splitlines():
        if not line.startswith("#"):
            if in_block:
                break
            continue
        body = line[1:]
        if body.strip().lower() == "sources":
            in_block, key = True, None
            continue
        if not in_block:
            continue
        if not body.strip():
            break
        m = re.match(r"\s+\[([^\]]+)\]\s+(.*)", body)
        if m:
            key = m.group(1).strip()
            refs[key] = m.group(2).strip()
        elif key and body.startswith("   "):
            refs[key] += " " + body.strip()
        else:
            break
    return refs


# ---- periods -----------------------------------------------------------------------------------
@dataclass
class Period:
    kind: str
    label: str
    start: datetime | None     # aware
    end: datetime | None
    tz: str

    def utc(self) -> tuple[str, str]:
        lo = self.start.astimezone(timezone.utc).isoformat(timespec="milliseconds") if self.start else ""
        hi = self.end.astimezone(timezone.utc).isoformat(timespec="milliseconds") if self.end else "9999"
        return lo, hi


def _parse_local(s: str, tz: ZoneInfo, what: str) -> datetime:
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ReportError(f"{what} {s!r}: give an ISO date or date-time, e.g. 2026-11-23 or 2026-11-23T14:00") from None
    return dt.replace(tzinfo=tz) if dt.tzinfo is None else dt


def day_period(tzname: str, day: str | None = None, now: datetime | None = None) -> Period:
    tz = ZoneInfo(tzname)
    if day:
        try:
            d = date.fromisoformat(day)
        except ValueError:
            raise ReportError(f"--date {day!r}: give a date such as 2026-11-23") from None
    else:
        d = (now or datetime.now(tz)).astimezone(tz).date()
    start = datetime.combine(d, dtime(0, 0), tz)
    end = datetime.combine(d + timedelta(days=1), dtime(0, 0), tz)
    return Period("day", d.isoformat(), start, end, tzname)


def shift_period(tzname: str, shifts: list[str], at: str | None = None, previous: bool = False,
                 now: datetime | None = None) -> Period:
    tz = ZoneInfo(tzname)
    t = _parse_local(at, tz, "--at") if at else (now or datetime.now(tz))
    t = t.astimezone(tz)
    starts: list[datetime] = []
    for dd in (-1, 0, 1):
        d = t.date() + timedelta(days=dd)
        for s in sorted(shifts):
            hh, mm = map(int, s.split(":"))
            starts.append(datetime.combine(d, dtime(hh, mm), tz))
    starts.sort()
    i = max(k for k, s in enumerate(starts) if s <= t)
    if previous:
        i -= 1
    start, end = starts[i], starts[i + 1]
    n = sorted(shifts).index(start.strftime("%H:%M")) + 1
    return Period("shift", f"{start.date().isoformat()} shift {n} ({start:%H:%M}–{end:%H:%M})", start, end, tzname)


def range_period(tzname: str, frm: str, to: str) -> Period:
    tz = ZoneInfo(tzname)
    lo = _parse_local(frm, tz, "--from")
    hi = _parse_local(to, tz, "--to")
    if len(to) == 10:          # a bare date: through the end of that day
        hi = hi + timedelta(days=1)
    if hi <= lo:
        raise ReportError(f"--to {to} is not after --from {frm}")
    return Period("range", f"{lo:%Y-%m-%d %H:%M} – {hi:%Y-%m-%d %H:%M}", lo, hi, tzname)


# ---- the report --------------------------------------------------------------------------------
def delivered_bin(item: dict[str, Any]) -> tuple[int, str]:
    """(bin the item went to, status): status is confirmed | manual | failed | unconfirmed."""
    o = item["outcome"]
    if item["bin"] == 0 or item["decision_outcome"] == "manual":
        return 0, "manual"
    if o == "fired":
        return item["bin"], "confirmed"
    if o in FAILED_OUTCOMES or o.startswith("nak:"):
        return 0, "failed"
    return item["bin"], "unconfirmed"


def _top_share(votes_json: str) -> float:
    try:
        v = json.loads(votes_json)
    except (TypeError, ValueError):
        return 1.0
    total = sum(x for x in v.values() if isinstance(x, (int, float)) and x > 0)
    return max(v.values()) / total if total > 0 else 1.0


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def build_report(store: Store, comp: Composition, period: Period | None = None, lot_number: str | None = None,
                 now: datetime | None = None) -> dict[str, Any]:
    lot = None
    verification = None
    if lot_number is not None:
        lot = store.lot(lot_number)
        if lot is None:
            raise ReportError(f"no lot {lot_number} in the records or their archives (`kozan lot list`)")
        items = store.rows("SELECT * FROM items WHERE lot_id=? ORDER BY id", (lot["id"],))
        alarms = store.rows("SELECT * FROM alarms WHERE lot_id=? ORDER BY id", (lot["id"],))
        verification = verify_lot(list(store.each()), lot_number)
        tzname = period.tz if period else "UTC"
        label = f"lot {lot_number}"
        kind = "lot"
        window = (lot["opened_at"], lot["closed_at"])
    else:
        assert period is not None
        lo, hi = period.utc()
        items = store.rows("SELECT * FROM items WHERE decided_at >= ? AND decided_at < ? ORDER BY id", (lo, hi))
        alarms = store.rows("SELECT * FROM alarms WHERE at >= ? AND at < ? ORDER BY id", (lo, hi))
        tzname, label, kind = period.tz, period.label, period.kind
        window = (lo, hi if hi != "9999" else None)
    run_ids = sorted({i["run_id"] for i in items} | {a["run_id"] for a in alarms if a["run_id"] is not None})
    runs = []
    for rid in run_ids:
        rr = store.rows("SELECT id, started_at, ended_at, mode, model_version, config_json FROM runs WHERE id=?",
                        (rid,))
        runs.extend(rr)
    bin_names = dict(DEFAULT_BIN_NAMES)
    for r in runs:       # the newest run's names win
        try:
            names = json.loads(r["config_json"])["rules"]["bin_names"]
            bin_names.update({int(k): v for k, v in names.items()})
        except (KeyError, TypeError, ValueError):
            pass

    per_class: dict[str, Counter] = defaultdict(Counter)
    per_bin_cls: dict[int, Counter] = defaultdict(Counter)
    status: Counter = Counter()
    bin_status: dict[int, Counter] = defaultdict(Counter)
    conf: dict[int, list[float]] = defaultdict(list)
    foreign: dict[int, list[float]] = defaultdict(list)
    manual_reasons: Counter = Counter()
    failed: Counter = Counter()
    versions: Counter = Counter()
    for it in items:
        b, st = delivered_bin(it)
        per_class[it["class_name"]][b] += 1
        per_bin_cls[b][it["class_name"]] += 1
        status[st] += 1
        bin_status[it["bin"]][st] += 1
        versions[it["model_version"]] += 1
        if st == "manual":
            manual_reasons[it["reason"]] += 1
        elif st == "failed":
            failed[it["outcome"].split(":")[0] if not it["outcome"].startswith("nak:") else it["outcome"]] += 1
        conf[b].append(float(it["confidence"]))
        foreign[b].append(1.0 - _top_share(it["votes_json"]))

    unknown_mass = sorted(c for c in per_class if comp.mass_g(c) is None)
    metals: dict[str, dict[str, Any]] = {}
    class_rows = []
    for c in sorted(per_class, key=lambda k: -sum(per_class[k].values())):
        n = sum(per_class[c].values())
        mg = comp.mass_g(c) or 0.0
        entry = comp.classes.get(c, {})
        rng = entry.get("mass_range_g") or [mg, mg]
        class_rows.append({"class": c, "items": n, "bins": {str(b): k for b, k in sorted(per_class[c].items())},
                           "mass_g_each": mg, "mass_kg": _r(n * mg / 1000),
                           "mass_kg_range": [_r(n * rng[0] / 1000), _r(n * rng[1] / 1000)]})
        for b, k in per_class[c].items():
            t = k * mg / 1e6          # tonnes
            for m, spec in (entry.get("metals") or {}).items():
                y = comp.yields.get(m, 1.0)
                g = t * float(spec["g_per_t"])
                lo, hi = (spec.get("range") or [spec["g_per_t"]] * 2)
                e = metals.setdefault(m, {"metal": m, "contained_g": 0.0, "recoverable_g": 0.0, "yield": y,
                                          "range_g": [0.0, 0.0], "by_class_g": Counter(), "by_bin_g": Counter()})
                e["contained_g"] += g
                e["recoverable_g"] += g * y
                e["range_g"][0] += t * lo
                e["range_g"][1] += t * hi
                e["by_class_g"][c] += g
                e["by_bin_g"][str(b)] += g
    order = {m: i for i, m in enumerate(("Au", "Pd", "Ag", "Cu", "Li", "Co", "Ni", "Pb", "Zn", "Mn", "REE"))}
    metal_rows = []
    for m in sorted(metals, key=lambda k: order.get(k, 99)):
        e = metals[m]
        # grams to 4 decimals: a small lot's palladium is a fraction of a gram
        metal_rows.append({"metal": m, "contained_g": _r(e["contained_g"], 4), "recoverable_g": _r(e["recoverable_g"], 4),
                           "yield": e["yield"], "range_g": [_r(e["range_g"][0], 4), _r(e["range_g"][1], 4)],
                           "by_class_g": {k: _r(v, 4) for k, v in e["by_class_g"].items()},
                           "by_bin_g": {k: _r(v, 4) for k, v in sorted(e["by_bin_g"].items())}})

    bins = sorted(set(bin_names) | set(per_bin_cls))
    bin_rows = []
    for b in bins:
        cls = per_bin_cls.get(b, Counter())
        n = sum(cls.values())
        mass = sum(k * (comp.mass_g(c) or 0.0) for c, k in cls.items()) / 1000
        decided = bin_status.get(b, Counter())
        row = {"bin": b, "name": bin_names.get(b, f"bin {b}"), "items": n, "mass_kg": _r(mass),
               "classes": dict(cls.most_common()),
               "mean_confidence": _r(sum(conf[b]) / len(conf[b])) if conf[b] else None,
               "min_confidence": _r(min(conf[b])) if conf[b] else None,
               "expected_foreign_share": _r(sum(foreign[b]) / len(foreign[b]), 4) if foreign[b] else None}
        if b != 0:
            sent = decided["confirmed"] + decided["unconfirmed"] + decided["failed"]
            row.update({"decided": sent, "confirmed": decided["confirmed"], "unconfirmed": decided["unconfirmed"],
                        "failed": decided["failed"],
                        "confirmed_share": _r(decided["confirmed"] / sent, 4) if sent else None})
        bin_rows.append(row)

    al: dict[str, dict[str, Any]] = {}
    for a in alarms:
        e = al.setdefault(a["code"], {"code": a["code"], "severity": a["severity"], "count": 0,
                                      "first_at": a["at"], "last_at": a["at"], "last_message": a["message"]})
        e["count"] += 1
        e["last_at"], e["last_message"] = a["at"], a["message"]
        if a["severity"] == "fault":
            e["severity"] = "fault"
    n_items = len(items)
    total_mass = sum(r["mass_kg"] for r in class_rows)
    rep: dict[str, Any] = {
        "report": kind, "title": f"Kozan sorting report — {label}",
        "generated_at": (now or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="seconds"),
        "station": socket.gethostname(),
        "period": {"label": label, "timezone": tzname, "from": window[0], "to": window[1],
                   "first_item_at": items[0]["decided_at"] if items else None,
                   "last_item_at": items[-1]["decided_at"] if items else None},
        "totals": {"items": n_items, "mass_kg": _r(total_mass), "sorted": status["confirmed"] + status["unconfirmed"],
                   "confirmed": status["confirmed"], "unconfirmed": status["unconfirmed"],
                   "manual": status["manual"], "missed_or_failed": status["failed"]},
        "per_bin": bin_rows,
        "per_class": class_rows,
        "metals": metal_rows,
        "manual": {"items": status["manual"], "by_reason": dict(manual_reasons.most_common())},
        "missed": {"items": status["failed"], "by_outcome": dict(failed.most_common())},
        "alarms": sorted(al.values(), key=lambda e: (e["severity"] != "fault", -e["count"])),
        "model_versions": [{"version": v, "items": k} for v, k in versions.most_common()],
        "runs": [{k: r[k] for k in ("id", "mode", "started_at", "ended_at", "model_version")} for r in runs],
        "composition": {"path": comp.path, "sha256": comp.sha256, "classes_without_mass": unknown_mass,
                        "sources": comp.sources([r["class"] for r in class_rows])},
        "notes": [
            "Masses and metal contents are estimates: item count x average mass per class x typical content "
            "per class (the composition table above, with the published sources of its figures). Only an "
            "assay of the sorted material measures its content.",
            "Classes are the station's vote for each item, not an inspection. Purity indicators are "
            "model-based; measure purity by inspecting samples from each bin.",
        ],
    }
    if lot is not None:
        rep["lot"] = {k: lot[k] for k in ("lot_number", "origin_country", "supplier", "consignment_ref", "basel_ref",
                                          "opened_at", "opened_by", "closed_at", "closed_by", "sealed_at",
                                          "sealed_head", "sealed_records", "genesis_hash", "head_hash", "records")}
        assert verification is not None
        rep["lot"]["verification"] = {"ok": verification.ok, "links": verification.records,
                                      "head": verification.head, "problems": verification.problems}
    return rep
