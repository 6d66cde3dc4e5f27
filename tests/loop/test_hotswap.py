"""Hot-swap: a validated model takes over between two frames; the belt, the tracks and the old model
(when the new one is refused) carry on."""
from __future__ import annotations

import shutil
import time

import onnx
import pytest

from station.config import StationConfig
from station.simrun import run_fast
from tests.loop.conftest import REPO


def test_swap_between_frames_in_virtual_time_keeps_every_track_and_frame():
    """Perfect detections before and after: any sorting error would be the switch's fault."""
    from station.simline.oracle import OracleDetector

    swapped = {"calls": 0}

    def on_frame(k, core):
        swapped["calls"] += 1
        if k == 60:     # 2 s in: items are in view, some not yet decided
            new = OracleDetector(core.detector.camera, score=0.8)
            new.info = type(core.detector.info)(version="oracle-b")
            core.offer_detector(new, "oracle-b")
            swapped["tracks"] = len(core.tracker.tracks)

    rep = run_fast(StationConfig(), 16, seed=9, oracle=True, on_frame=on_frame)
    assert rep["purity"] == 1.0 and rep["recovery"] == 1.0
    (sw,) = rep["swaps"]
    assert sw["from"] == "ground-truth-oracle" and sw["to"] == "oracle-b"
    assert sw["frame"] == 61 and sw["tracks_in_flight"] == swapped["tracks"] > 0
    assert rep["frames"] == swapped["calls"]                   # every rendered frame was processed


def test_swap_refuses_other_classes():
    from station.simline.oracle import OracleDetector

    def on_frame(k, core):
        if k == 1:
            other = OracleDetector(core.detector.camera)
            other.names = tuple(reversed(other.names))
            with pytest.raises(ValueError, match="scramble the tracks"):
                core.offer_detector(other, "reversed")

    rep = run_fast(StationConfig(), 2, seed=9, oracle=True, on_frame=on_frame)
    assert rep["swaps"] == []


@pytest.mark.slow
def test_running_station_hot_swaps_refuses_bad_models_and_follows_the_registry(tmp_path):
    """A real-time station on the simulated line: a corrupt file is refused with an alarm while the
    old model runs on; a promotion in the registry switches the running model without stopping."""
    from station.config import config_from_dict
    from station.runtime import Station
    from tests.hmi.conftest import wait_for
    from vision.registry import Registry, resolve_model_path

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy2(resolve_model_path(REPO / "models" / "active.onnx"), models / "active.onnx")   # legacy layout
    cfg = config_from_dict({"detector": {"model": str(models / "active.onnx")}, "hmi": {"enabled": False},
                            "capture": {"enabled": True, "dir": str(tmp_path / "collected"), "random_rate": 0.0}})
    st = Station(cfg, records_path=str(tmp_path / "r.sqlite"))
    v0 = st.core.model_version
    st.start()
    try:
        wait_for(lambda: st.core.counters.frames > 20, 60, "frames")
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"\x00" * 1000)
        st.swap_model(bad).join(60)
        rec = st.swap_log[-1]
        assert rec["ok"] is False and "corrupt" in rec["error"]
        assert any(a.code == "model_refused" and "keeps running" in a.message for a in st.alarms.active())
        f0 = st.core.counters.frames
        wait_for(lambda: st.core.counters.frames > f0 + 5, 60, "frames after a refusal")
        assert st.core.model_version == v0
        # promote a copy through the registry: the station notices and swaps while running
        reg = Registry(models)
        copy = onnx.load(str(models / "active.onnx"))   # the same weights under a name of their own
        next(p for p in copy.metadata_props if p.key == "kozan_version").value = f"{v0}-copy"
        onnx.save(copy, str(tmp_path / "copy.onnx"))
        reg.register(tmp_path / "copy.onnx", version=f"{v0}-copy")
        reg.set_active(f"{v0}-copy", "test")
        wait_for(lambda: st.core.model_version == f"{v0}-copy", 60, "the registry hot-swap")
        # the core switches between two frames; the loader thread appends its record once it has seen the
        # switch (it polls every 2 ms), so the record can trail the version by a moment
        wait_for(lambda: len(st.swap_log) == 2, 10, "the hot-swap's record")
        rec = st.swap_log[-1]
        assert rec["ok"] and rec["switch"]["tracks_in_flight"] >= 0 and rec["frames_during"] >= 0
        print(f"\nhot-swap: load+validate {rec['load_s']} s, frames processed meanwhile {rec['frames_during']}, "
              f"frames dropped meanwhile {rec['dropped_during']} (total dropped {st.mailbox.dropped} of "
              f"{st.mailbox.captured})")
        f1 = st.core.counters.frames
        wait_for(lambda: st.core.counters.frames > f1 + 5, 60, "frames after the swap")
        assert st.state.state.value == "running"
        # the operator's wrong-bin flag on the HMI captures that item's frame
        from fastapi.testclient import TestClient

        from station.hmi.server import Hmi

        client = TestClient(Hmi(st, cfg.hmi, audit_path=tmp_path / "audit.jsonl").app)
        tid = wait_for(lambda: st.core.recent and st.core.recent[-1][0].track_id, 60, "a decided item")
        r = client.post(f"/api/items/{tid}/wrong-bin", json={"note": "nimh among the alkalines"})
        assert r.status_code == 200, r.text
        meta = wait_for(lambda: list((tmp_path / "collected" / "meta").glob(f"{r.json()['capture']}.json")), 10,
                        "the flagged frame on disk")
        assert '"wrong_bin"' in meta[0].read_text()
        assert client.post("/api/items/999999/wrong-bin", json={}).status_code == 404
    finally:
        st.stop()
