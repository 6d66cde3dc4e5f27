"""Reports from real SQLite records: figures, periods, formats, archives."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from station.lots import LotInfo
from station.records import Records
from station.reporting.archive import archive
from station.reporting.build import Composition, build_report, day_period, range_period, shift_period
from station.reporting.render import PdfUnavailable, bar_chart, to_csv, to_html, write_all
from station.reporting.store import Store

REPO = Path(__file__).resolve().parents[2]

COMP = Composition.load(__import__("station.config", fromlist=["StationConfig"]).StationConfig().resolve(
    "station/composition.yaml"))


class _Alarm:
    code, message, last_s = "missed_item", "item 9 could not be diverted in time", 12.0

    class severity:  # noqa: N801 - mimics Severity.WARNING
        value = "warning"


def _records(path, make_item, lot=True):
    r = Records(path, batch_s=0.02)
    r.start_run("sim-fast", "det-test", {"rules": {"bin_names": {"0": "manual", "3": "high boards",
                                                                 "4": "low boards", "1": "Li-ion", "2": "other"}}})
    if lot:
        r.open_lot(LotInfo("KZ-1", "DE", "Berlin Scrap GmbH", basel_ref="DE-2026-1"))
    for i in range(10):                                        # 10 high-grade boards, 8 fired, 1 missed, 1 NAK
        r.item_decided(make_item(i, "board_high", 3, command_id=i, outcome="missed" if i == 9 else "sent",
                                 confidence=0.8))
    for i in range(10, 14):                                    # 4 Li-ion cells, all fired
        r.item_decided(make_item(i, "li_ion_cell", 1, command_id=i))
    r.item_decided(make_item(20, "alkaline", 0, reason="low_confidence", confidence=0.4))
    r.flush()
    for i in list(range(8)) + list(range(10, 14)):
        r.item_outcome(i, "fired", 5.0 + i, fired_count=1)
    r.item_outcome(8, "nak:LATE", 5.0)
    r.alarm_raised(_Alarm(), 9)
    r.alarm_raised(_Alarm(), 8)
    if lot:
        r.close_lot("test", drain_s=0.2)
    r.end_run({})
    r.close()


def test_lot_report_figures(tmp_path, make_item):
    p = tmp_path / "r.sqlite"
    _records(p, make_item)
    with Store(p) as s:
        rep = build_report(s, COMP, lot_number="KZ-1")
    t = rep["totals"]
    assert t == {"items": 15, "mass_kg": round(10 * 0.120 + 4 * 0.055 + 0.024, 3), "sorted": 12, "confirmed": 12,
                 "unconfirmed": 0, "manual": 1, "missed_or_failed": 2}
    bins = {b["bin"]: b for b in rep["per_bin"]}
    assert bins[3]["items"] == 8 and bins[3]["classes"] == {"board_high": 8} and bins[3]["name"] == "high boards"
    assert bins[0]["classes"] == {"board_high": 2, "alkaline": 1}
    assert bins[3]["confirmed"] == 8 and bins[3]["failed"] == 2 and bins[3]["confirmed_share"] == 0.8
    assert bins[3]["expected_foreign_share"] == pytest.approx(0.2, abs=1e-4)     # votes 0.8 / 0.2
    metals = {m["metal"]: m for m in rep["metals"]}
    # 10 boards x 120 g = 1.2 kg = 0.0012 t at 250 g/t Au -> 0.3 g contained, 95 % recoverable
    assert metals["Au"]["contained_g"] == pytest.approx(0.3) and metals["Au"]["recoverable_g"] == pytest.approx(0.285)
    assert metals["Au"]["by_bin_g"] == {"0": pytest.approx(0.06), "3": pytest.approx(0.24)}
    assert metals["Co"]["contained_g"] == pytest.approx(4 * 55e-6 * 120000)
    assert rep["manual"]["by_reason"] == {"low_confidence": 1}
    assert rep["missed"]["by_outcome"] == {"missed": 1, "nak:LATE": 1}
    assert rep["alarms"][0]["code"] == "missed_item" and rep["alarms"][0]["count"] == 2
    assert rep["model_versions"] == [{"version": "det-test", "items": 15}]
    assert rep["lot"]["verification"]["ok"] and rep["lot"]["records"] == 15 + 13
    assert rep["composition"]["sha256"] == COMP.sha256

    rows = list(csv.DictReader(io.StringIO(to_csv(rep))))
    assert sum(int(r["items"]) for r in rows if r["class"] != "TOTAL") == 15
    assert [r for r in rows if r["class"] == "TOTAL"][0]["Au_g_est"] == "0.3"
    page = to_html(rep)
    assert "<svg" in page and "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert rep["lot"]["head_hash"] in page and "chain verified" in page and "Berlin Scrap GmbH" in page


def test_periods_are_plant_local():
    tokyo = "Asia/Tokyo"
    now = datetime(2026, 11, 24, 3, 30, tzinfo=ZoneInfo(tokyo))             # 03:30: the night shift
    s = shift_period(tokyo, ["06:00", "14:00", "22:00"], now=now)
    assert (s.start.isoformat(), s.end.isoformat()) == ("2026-11-23T22:00:00+09:00", "2026-11-24T06:00:00+09:00")
    assert s.utc() == ("2026-11-23T13:00:00.000+00:00", "2026-11-23T21:00:00.000+00:00")
    prev = shift_period(tokyo, ["06:00", "14:00", "22:00"], at="2026-11-24T03:30", previous=True)
    assert prev.start.hour == 14 and prev.end.hour == 22 and "shift 2" in prev.label
    d = day_period(tokyo, "2026-11-24")
    assert d.utc() == ("2026-11-23T15:00:00.000+00:00", "2026-11-24T15:00:00.000+00:00")
    r = range_period("UTC", "2026-11-01", "2026-11-02")
    assert r.utc() == ("2026-11-01T00:00:00.000+00:00", "2026-11-03T00:00:00.000+00:00")


def test_archive_moves_rows_and_reports_still_read_them(tmp_path, make_item):
    p = tmp_path / "r.sqlite"
    _records(p, make_item)
    with Store(p) as s:
        before = build_report(s, COMP, range_period("UTC", "2000-01-01", "2100-01-01"))
    res = archive(p, tmp_path / "archive", "2100-01-01")
    assert res["moved"]["lots"] == 1 and res["moved"]["items"] == 15
    db = sqlite3.connect(p)
    assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM lots").fetchone()[0] == 0
    db.close()
    # new rows keep counting up: nothing tailing the live database by id sees an id twice
    r = Records(p)
    r.start_run("line", "m", {})
    r.item_decided(make_item(99, "nimh", 2, command_id=1))
    r.close()
    assert sqlite3.connect(p).execute("SELECT id FROM items").fetchone()[0] == 16
    with Store(p, tmp_path / "archive") as s:
        after = build_report(s, COMP, range_period("UTC", "2000-01-01", "2100-01-01"))
        lot = build_report(s, COMP, lot_number="KZ-1")
    assert after["totals"]["items"] == before["totals"]["items"] + 1
    assert lot["lot"]["verification"]["ok"], lot["lot"]["verification"]["problems"]
    # an archive interrupted between copy and delete: the rows are in both files, counted once
    shutil.copy(tmp_path / "archive" / "kozan-archive-2100-01-01.sqlite", tmp_path / "archive" / "kozan-archive-2100-01-02.sqlite")
    with Store(p, tmp_path / "archive") as s:
        assert build_report(s, COMP, lot_number="KZ-1")["totals"]["items"] == 15


def test_files_and_pdf(tmp_path, make_item):
    p = tmp_path / "r.sqlite"
    _records(p, make_item)
    with Store(p) as s:
        rep = build_report(s, COMP, lot_number="KZ-1")
    formats = ["json", "csv", "html"] + (["pdf"] if shutil.which("/usr/bin/chromium") else [])
    try:
        out = write_all(rep, tmp_path / "out", "lot-KZ-1", formats)
    except PdfUnavailable as e:        # chromium present but unable to print here: say so, keep the rest
        pytest.skip(f"chromium could not print: {e}")
    assert json.loads((tmp_path / "out" / "lot-KZ-1.json").read_text())["lot"]["lot_number"] == "KZ-1"
    if "pdf" in out:
        assert (tmp_path / "out" / "lot-KZ-1.pdf").read_bytes()[:5] == b"%PDF-"


def test_archive_keeps_what_the_plant_has_not_confirmed(tmp_path, make_item):
    """The plant publisher tails the live database by id: archiving past its confirmed id would lose rows."""
    from station.plant.outbox import OutboxCursor, default_outbox_path, plant_confirmed_id

    p = tmp_path / "r.sqlite"
    _records(p, make_item, lot=False)                      # 15 items, no lot
    assert plant_confirmed_id(default_outbox_path(p), p) is None
    cur = OutboxCursor(default_outbox_path(p), "line-1", p)
    cur.save(acked_id=12, confirmed_id=9)                 # the plant has stored items 1..9
    cur.close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "station.cli", "records", "archive", "--records", str(p),
                        "--archive-dir", str(tmp_path / "archive"), "--before", "2100-01-01"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "up to #9" in r.stderr and json.loads(r.stdout)["moved"]["items"] == 9
    left = [x[0] for x in sqlite3.connect(p).execute("SELECT id FROM items ORDER BY id")]
    assert left == list(range(10, 16))
    # the plant catches up; the next archive takes the rest
    cur = OutboxCursor(default_outbox_path(p), "line-1", p)
    cur.save(acked_id=15, confirmed_id=15)
    cur.close()
    assert archive(p, tmp_path / "archive", "2100-01-01",
                   keep_after_id=plant_confirmed_id(default_outbox_path(p), p))["moved"]["items"] == 6


ALL_CLASSES = ["board_high", "board_low", "li_ion_cell", "li_ion_pack", "nimh", "alkaline", "coin_cell", "lead_acid"]
SVG = "{http://www.w3.org/2000/svg}"


def _legend_entries(svg: str) -> tuple[float, float, list[tuple[str, float, float]]]:
    root = ET.fromstring(svg)
    _, _, w, h = (float(v) for v in root.get("viewBox").split())
    assert float(root.get("width")) == w and float(root.get("height")) == h
    return w, h, [(t.text, float(t.get("x")), float(t.get("y"))) for t in root.iter(f"{SVG}text")
                  if t.get("class") == "lg"]


def test_chart_legend_fits_the_chart_with_every_class():
    """All 8 classes on one chart: every series has a legend entry, and every entry lies inside the SVG."""
    rows = [(f"{b} bin", [(c, float(1 + (b + i) % 3)) for i, c in enumerate(ALL_CLASSES)]) for b in range(5)]
    for width in (640, 480):
        svg = bar_chart("Items per bin, by class", rows, "items", width=width, legend=ALL_CLASSES)
        w, h, entries = _legend_entries(svg)
        assert w == width and [e[0] for e in entries] == ALL_CLASSES
        for name, x, y in entries:
            # 6.5 px a character at 11 px is generous for Noto/DejaVu Sans lowercase
            assert 0 <= x and x + 6.5 * len(name) <= w, (name, x, w)
            assert 10 <= y <= h - 3, (name, y, h)
        boxes = sorted((y, x, x + 6.5 * len(n)) for n, x, y in entries)
        for (y1, _, e1), (y2, s2, _) in zip(boxes, boxes[1:]):
            assert y2 > y1 or s2 >= e1, "legend entries overlap"
        # each entry's swatch has the colour of its class's bars
        root = ET.fromstring(svg)
        bar_fill = {r.find(f"{SVG}title").text.split(":")[0]: r.get("fill") for r in root.iter(f"{SVG}rect")
                    if r.find(f"{SVG}title") is not None}
        swatches = [r.get("fill") for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is None]
        assert swatches == [bar_fill[c] for c in ALL_CLASSES]


def test_report_prints_the_composition_sources(tmp_path, make_item):
    """The note points at the table 'with the published sources of its figures': the page prints them."""
    p = tmp_path / "r.sqlite"
    _records(p, make_item)
    with Store(p) as s:
        rep = build_report(s, COMP, lot_number="KZ-1")
    src = rep["composition"]["sources"]
    assert set(src["per_class"]) == {"board_high", "li_ion_cell", "alkaline"}
    assert {"metals": ["Zn", "Mn"], "source": "S09"} in src["per_class"]["alkaline"]
    assert src["references"]["S09"].startswith("E. Sayilgan et al.")
    assert "Hydrometallurgy 97 (2009)" in src["references"]["S09"]       # continuation lines joined
    assert {"H06", "UNEP09", "X08", "H19", "MF06", "S09", "E-CR", "ILA"} <= set(src["references"])
    page = to_html(rep)
    assert "Zn, Mn: S09" in page and "[S09]</b> E. Sayilgan et al." in page and "Hagelüken" in page
    # a table of the plant's own with a `sources:` mapping instead of the comment block
    own = tmp_path / "own.yaml"
    own.write_text("sources:\n  A1: Assay 2026-11, lab X\nclasses:\n  alkaline:\n    mass_g: 24\n"
                   "    metals:\n      Zn: {g_per_t: 1, source: A1}\n", encoding="utf-8")
    c = Composition.load(own)
    assert c.sources(["alkaline", "nimh"]) == {"per_class": {"alkaline": [{"metals": ["Zn"], "source": "A1"}]},
                                               "references": {"A1": "Assay 2026-11, lab X"}}
