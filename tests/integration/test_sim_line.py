"""The whole station on the simulated line, in virtual time, judged against ground truth."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from station.config import StationConfig
from station.simrun import run_fast

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_everything_after_detection_is_exact_with_a_perfect_detector(tmp_path):
    """With ground-truth detections, every item must land where it belongs: any error is the station's."""
    rep = run_fast(StationConfig(), 120, seed=11, records_path=tmp_path / "r.sqlite", oracle=True)
    assert rep["items"] == 120
    assert rep["purity"] == 1.0 and rep["recovery"] == 1.0, json.dumps(rep["per_class"])
    assert rep["missed"] == 0
    assert rep["fire_error_mm"]["p99"] < 3.0
    # boards carrying a battery and distractors all went to the manual path
    for truth, v in rep["per_class"].items():
        if "+battery" in truth or truth in ("cable", "plastic_fragment", "screw"):
            assert set(v["bins"]) == {"0"}, (truth, v)


def test_fast_mode_is_deterministic_for_a_seed():
    a = run_fast(StationConfig(), 40, seed=5, oracle=True)
    b = run_fast(StationConfig(), 40, seed=5, oracle=True)
    for k in ("items", "purity", "recovery", "per_bin", "per_class", "frames", "fire_error_mm"):
        assert a[k] == b[k], k


def test_one_metre_per_second_belt_still_sorts_exactly():
    cfg = StationConfig()
    cfg.line.belt_speed_mm_s = 1000.0
    rep = run_fast(cfg, 60, seed=3, oracle=True)
    assert rep["purity"] == 1.0 and rep["recovery"] == 1.0
    assert rep["fire_error_mm"]["p99"] < 3.0


def test_command_that_cannot_arrive_in_time_is_not_sent():
    """A margin longer than the lead to the nearer diverters: those commands are missed, never fired late."""
    cfg = StationConfig()
    # 380 mm of lead to diverter 1 at 0.5 m/s is 760 ms: bin 1 cannot meet 1 s, bins 2-4 can
    cfg.line.command_margin_ms = 1000.0
    rep = run_fast(cfg, 30, seed=2, oracle=True)
    assert rep["missed"] > 0
    assert "LATE" not in rep["station"]["naks"]           # nothing reached the MCU too late
    assert rep["purity"] == 1.0                            # what was sent landed where it belongs
    assert rep["per_bin"]["0"]["items"] >= rep["missed"]   # missed items rode to the end of the belt
    assert rep["per_bin"]["1"]["items"] == 0
    assert rep["alarms"].get("missed_item", 0) == rep["missed"]


@pytest.mark.slow
def test_whole_station_with_the_shipped_model_on_300_items(tmp_path, shipped_model):
    db = tmp_path / "records.sqlite"
    rep = run_fast(StationConfig(), 300, seed=21, records_path=db)
    print(json.dumps({k: rep[k] for k in ("items", "purity", "recovery", "missed", "frames", "wall_s")}))
    assert rep["items"] == 300
    # measured on exactly this run: det-v9-int8b and det-v9-int8 (shipped since 2026-11-25) purity 1.0 /
    # recovery 0.9886; det-v9 1.0 / 0.9962; det-v4 purity 0.9962 / recovery 0.9962 with both inspectors (insp-v2,
    # batt-v2; with batt-v1 0.9962 / 0.9924); 0.9805 / 0.9545 with insp-v1 alone; det-v4 alone:
    # 0.9839 / 0.9242; det-v3: 0.9684 / 0.928; det-v1: 0.90 / 0.41 on 200 items. The floors leave room for about 5 items either way: they guard
    # the wiring and the models against regressions, not a figure to the last item.
    assert rep["purity"] >= 0.98, rep["per_bin"]
    assert rep["recovery"] >= 0.97, rep["per_bin"]
    # the records agree with the station's own counters
    con = sqlite3.connect(db)
    n = con.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    fired = con.execute("SELECT COUNT(*) FROM items WHERE outcome='fired'").fetchone()[0]
    assert n == rep["station"]["decided"]
    assert fired == rep["station"]["fired"] == rep["station"]["sent"]
    versions = {r[0] for r in con.execute("SELECT DISTINCT model_version FROM items")}
    assert versions == {rep["model_version"]}


def test_station_runtime_never_imports_torch():
    code = ("import sys, station.runtime, station.simrun, station.cli, vision.detector; "
            "bad = [m for m in ('torch', 'ultralytics') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
def test_board_inspector_finds_cells_the_detectors_far_view_misses(tmp_path):
    """Boards only, half of them carrying a battery, the same items with and without the closer look."""
    from station.config import config_from_dict

    base = {"sim": {"board_battery_share": 0.5, "distractor_share": 0.0,
                    "class_mix": {"board_high": 1.0, "board_low": 1.0}}}
    far = run_fast(config_from_dict(base | {"inspector": {"model": None}}), 50, seed=5)
    near = run_fast(config_from_dict(base), 50, seed=5)           # the shipped board inspector (default)

    def with_cell_to_manual(rep):
        pc = rep["per_class"]
        n = sum(v["count"] for k, v in pc.items() if k.endswith("+battery"))
        return n, sum(v["bins"].get("0", 0) for k, v in pc.items() if k.endswith("+battery"))

    n, far_caught = with_cell_to_manual(far)
    _, near_caught = with_cell_to_manual(near)
    print(json.dumps({"boards_with_a_cell": n, "far": far_caught, "near": near_caught,
                      "looks": near["station"]["board_looks"], "far_rec": far["recovery"], "near_rec": near["recovery"]}))
    assert far["station"]["board_looks"] == 0
    # every board track is looked at, at most `looks` times (3), and only while wholly in view. Looks are
    # per track, decided or not: det-v9 follows one of these 50 boards twice (lost, then found again too
    # late to sort: `late_detection`), so 51 tracks are decided and 152 looks made; det-v9-int8 decides 50
    # and makes 151, one look going to a track dropped undecided (`lost_tracks` 3; det-v9: 4); det-v9-int8b 150
    decided, dropped = near["station"]["decided"], near["station"]["lost_tracks"]
    assert 50 <= decided <= 52 and dropped <= 5
    assert 50 <= near["station"]["board_looks"] <= 3 * (decided + dropped)
    # measured: 24 boards with a cell; far view 4 to manual, with the inspector 24 (insp-v2; insp-v1: 22)
    assert near_caught >= far_caught + 10 and near_caught >= 0.8 * n
    clean_to_manual = sum(v["bins"].get("0", 0) for k, v in near["per_class"].items() if k in ("board_high", "board_low"))
    assert clean_to_manual <= 2, near["per_class"]
    # what the look buys is purity: boards carrying a cell leave the board bins (measured: 0.565 -> 1.0 with
    # det-v9, 0.545 -> 1.0 with det-v4). Recovery is the price of a false look: one clean board in 26 to
    # manual, 1.0 -> 0.962 with det-v9 (det-v4's far view lost two clean boards itself: 0.923 -> 0.962)
    assert near["purity"] > far["purity"] and near["purity"] >= 0.98


@pytest.mark.slow
def test_battery_inspector_sorts_cells_the_far_view_cannot_tell_apart(shipped_model):
    """Loose batteries only, the same items with and without the close looks at each battery."""
    from station.config import config_from_dict

    base = {"sim": {"distractor_share": 0.1, "board_battery_share": 0.0,
                    "class_mix": {"li_ion_cell": 1.0, "alkaline": 1.0, "nimh": 1.0, "coin_cell": 0.5}}}
    far = run_fast(config_from_dict(base | {"inspector": {"battery_model": None}}), 150, seed=5)
    near = run_fast(config_from_dict(base), 150, seed=5)
    print(json.dumps({"looks": near["station"]["battery_looks"], "far": [far["purity"], far["recovery"]],
                      "near": [near["purity"], near["recovery"]], "far_reasons": far["station"]["reasons"],
                      "near_reasons": near["station"]["reasons"]}))
    assert far["station"]["battery_looks"] == 0
    # each battery is read at most `battery_looks` (3) times, while wholly in view
    assert 135 * 0.9 <= near["station"]["battery_looks"] <= 3 * 150
    assert near["recovery"] > far["recovery"]
    assert near["purity"] >= far["purity"] - 0.005
    # no Li-ion cell into the other-battery bin, with or without the looks
    for rep in (far, near):
        assert rep["per_class"]["li_ion_cell"]["bins"].get("2", 0) == 0, rep["per_class"]
