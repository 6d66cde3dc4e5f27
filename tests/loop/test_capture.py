"""Capture on the line: what is captured and why, and that the loop never waits for the disk."""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from station.alarms import AlarmBoard
from station.capture import Capture
from station.config import CaptureConfig
from station.sorting import Decision, Reason
from vision.detections import Detections
from vision.frame import Frame
from vision.taxonomy import load_taxonomy

NAMES = tuple(load_taxonomy().names)


def _decision(tid, cls="alkaline", conf=0.9, votes=None, b=2, reason=Reason.RULE):
    return Decision(tid, cls, conf, votes or {cls: conf * 5}, b, None if b == 0 else b, reason)


def _result(seq, decisions, t=None):
    img = np.full((72, 128, 3), seq % 250, np.uint8)
    det = Detections(np.array([[10, 10, 40, 30]], np.float32), np.array([0.8], np.float32), np.array([4], np.int32))
    f = Frame(seq, int((seq / 30 if t is None else t) * 1e9), img, seq * 100)
    return SimpleNamespace(frame=f, detections=det, decisions=decisions)


def _capture(tmp_path, wait_for_writer=True, **kw):
    """Waits for the writer unless told not to: frames here come faster than any camera, and a
    test about what is chosen must not depend on how busy the machine's disk and cores are."""
    cfg = CaptureConfig(enabled=True, **{"random_rate": 0.0, "max_per_min": 6000, **kw})
    alarms = AlarmBoard()
    return Capture(cfg, tmp_path / "col", NAMES, alarms, lambda: "det-test", truth=lambda: [("alkaline", (1, 2, 3, 4))],
                   wait_for_writer=wait_for_writer), alarms


def test_reasons_and_what_is_written(tmp_path):
    cap, _ = _capture(tmp_path)
    cases = {
        1: _decision(1, conf=0.9),                                           # confident, agreed: not captured
        2: _decision(2, conf=0.4, b=0, reason=Reason.LOW_CONFIDENCE),        # manual + low confidence
        3: _decision(3, conf=0.7, votes={"alkaline": 3.0, "nimh": 1.5}),    # runner-up holds a third
        4: _decision(4, cls="board_high", b=0, reason=Reason.BATTERY_ON_BOARD, conf=0.8),
    }
    for k, d in cases.items():
        cap.on_frame(_result(k, [d]))
    cap.close()
    metas = {m["track_id"]: m for m in (json.loads(p.read_text()) for p in (tmp_path / "col" / "meta").glob("*.json"))}
    assert set(metas) == {2, 3, 4}
    assert metas[2]["reasons"] == ["manual", "low_confidence"] and metas[2]["reason"] == "manual"
    assert metas[3]["reasons"] == ["disagreement"]
    assert metas[4]["reasons"] == ["manual"] and metas[4]["decision_reason"] == "battery_on_board"
    m = metas[3]
    assert m["model_version"] == "det-test" and m["labels"] == "model" and m["line_time_s"] == pytest.approx(0.1)
    assert m["sim_truth"] == [["alkaline", 1.0, 2.0, 3.0, 4.0]] and m["width"] == 128
    name = next(p.stem for p in (tmp_path / "col" / "meta").glob("*_t3.json"))
    # the pre-label is the model's detection in YOLO form: class cx cy w h, normalised
    assert (tmp_path / "col" / "labels" / f"{name}.txt").read_text().split() == \
        ["4", "0.195312", "0.277778", "0.234375", "0.277778"]
    assert (tmp_path / "col" / "images" / f"{name}.jpg").stat().st_size > 100
    assert cap.stats.per_reason == {"manual": 2, "low_confidence": 1, "disagreement": 1}


def test_random_sample_and_rate_limit_on_line_time(tmp_path):
    cap, _ = _capture(tmp_path, random_rate=1.0, max_per_min=60.0)      # one a second, small bursts
    for k in range(300):                                                 # 10 s of line time, an item a frame
        cap.on_frame(_result(k, [_decision(k)], t=k / 30))
    cap.close()
    assert 10 <= cap.stats.written <= 16, cap.stats.as_dict()
    assert cap.stats.written + cap.stats.rate_limited == 300
    assert cap.stats.per_reason["random"] == cap.stats.written


def test_a_slow_disk_drops_and_counts_never_blocks(tmp_path):
    cap, _ = _capture(tmp_path, wait_for_writer=False, queue=2)           # as on a real line
    gate = threading.Event()
    real = cap._write
    cap._write = lambda job: (gate.wait(10), real(job))                    # the disk hangs
    t0 = time.perf_counter()
    for k in range(20):
        cap.on_frame(_result(k, [_decision(k, conf=0.3, b=0, reason=Reason.LOW_CONFIDENCE)]))
    took = time.perf_counter() - t0
    assert took < 1.0                                                      # the loop did not wait
    # one job in the writer's hands, two queued, the rest dropped and counted
    assert cap.stats.dropped_queue_full >= 17 and cap.stats.queued <= 3
    gate.set()
    cap.close()
    assert cap.stats.written == cap.stats.queued


def test_quota_stops_capture_with_an_alarm_not_the_line(tmp_path):
    cap, alarms = _capture(tmp_path, quota_mb=0.01)                        # 10 kB: a few frames at most
    for k in range(30):
        cap.on_frame(_result(k, [_decision(k, conf=0.3, b=0, reason=Reason.LOW_CONFIDENCE)]))
        time.sleep(0.005)
    cap.close()
    assert cap.stats.stopped == "quota" and not cap.active
    a = [x for x in alarms.active() if x.code == "capture_stopped"]
    assert a and "quota" in a[0].message and "the line goes on" in a[0].message
    assert sum(p.stat().st_size for p in (tmp_path / "col").rglob("*") if p.is_file()) <= 10_000


def test_full_disk_stops_capture(tmp_path, monkeypatch):
    import shutil

    cap, alarms = _capture(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1e12, used=1e12, free=5e6))
    cap.on_frame(_result(1, [_decision(1, conf=0.3, b=0, reason=Reason.LOW_CONFIDENCE)]))
    cap.close()
    assert cap.stats.stopped == "disk" and cap.stats.written == 0
    assert "MB free" in alarms.active()[0].message


def test_operator_wrong_bin_flag_captures_a_recent_item(tmp_path):
    cap, _ = _capture(tmp_path, flag_window=3)
    for k in range(1, 6):
        cap.on_frame(_result(k, [_decision(k)]))                         # all confident: none captured
    name = cap.flag_wrong_bin(5, "a nimh in the alkaline bin")
    with pytest.raises(KeyError, match="no longer kept"):
        cap.flag_wrong_bin(1)
    cap.close()
    meta = json.loads((tmp_path / "col" / "meta" / f"{name}.json").read_text())
    assert meta["reasons"] == ["wrong_bin"] and meta["operator_note"] == "a nimh in the alkaline bin"
    assert meta["track_id"] == 5 and meta["bin"] == 2


def test_capture_on_the_simulated_line(tmp_path):
    """The loop hook, end to end on the simulated line (perfect detector, so: manual + random reasons)."""
    from station.config import StationConfig
    from station.simrun import run_fast

    cfg = StationConfig()
    cfg.capture.random_rate = 1.0                 # every decided item (a perfect detector decides ~all 12)
    cfg.capture.max_per_min = 600
    rep = run_fast(cfg, 12, seed=4, oracle=True, capture_dir=tmp_path / "col")
    st = rep["capture"]
    assert st["written"] >= 10 and st["dropped_queue_full"] == 0 and st["stopped"] is None
    metas = [json.loads(p.read_text()) for p in (tmp_path / "col" / "meta").glob("*.json")]
    assert len(metas) == st["written"]
    for m in metas:
        assert m["model_version"] == "ground-truth-oracle" and m["sim_truth"]
        assert set(m["reasons"]) <= {"manual", "random", "low_confidence", "disagreement"}
