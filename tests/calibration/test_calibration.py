"""Calibration tools on the simulated line: do they recover the truth they were never told?

One deliberately mis-set station (tilted, distorted, shifted camera; wrong encoder scale; diverters and
latencies unlike the configuration) is calibrated once through the `kozan calibrate` command line; the
tests then compare every measured value with the simulation's truth, and run the station on it.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from calibration.apply import calibrated_config, station_geometry
from calibration.store import CalibrationError, CalibrationStore
from station.cli import main
from station.config import ConfigError, config_from_dict
from station.simline.camera_model import GRID_STEP_PX, TrueCamera

TRUE_MPC = 0.1025
TRUE_POS = {1: 915.0, 2: 1110.0, 3: 1352.0, 4: 1571.0}
TRUE_LAT = {1: 22.0, 2: 9.0, 3: 31.0, 4: 15.0}
N_ITEMS = 30


def _truth_camera():
    return TrueCamera.straight_down(1.8, 1280, 720, dist=[-0.12, 0.05, 0.001, -0.001, 0.0], focal_scale=1.04,
                                    rvec=[0.03, -0.02, 0.01], shift_mm=(8.0, -5.0))


def _write_cfg(tmp: Path) -> Path:
    data = {"calibration": {"path": str(tmp / "active.yaml"), "history_dir": str(tmp / "history")},
            "sim": {"true_mm_per_count": TRUE_MPC, "true_diverter_position_mm": TRUE_POS,
                    "actuator_latency_ms": TRUE_LAT, "true_camera": _truth_camera().model_dump()}}
    p = tmp / "station.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calib")
    cfgp = str(_write_cfg(tmp))
    for args in (["camera", "--views", "10"], ["belt"], ["encoder", "--frames", "8"], ["diverters", "--repeats", "3"]):
        assert main(["calibrate", *args, "-c", cfgp, "--yes"]) == 0, args
    from station.config import load_config
    cfg = load_config(cfgp)
    return cfg, CalibrationStore.from_config(cfg).load()


def _x_origin(cfg) -> float:
    """Where the true camera's upstream image edge (middle row) meets the belt: the calibrated frame's x=0."""
    tc = TrueCamera(cfg.sim.true_camera, 1280, 720)
    return float(tc.px_to_belt(np.array([[0.0, 359.5]]))[0, 0])


def test_camera_focal_length_within_1_percent(calibrated):
    cfg, cal = calibrated
    f_true = cfg.sim.true_camera.fx
    fx, fy = cal.camera.camera_matrix[0][0], cal.camera.camera_matrix[1][1]
    print(f"focal error: fx {100 * (fx / f_true - 1):+.3f} %, fy {100 * (fy / f_true - 1):+.3f} %")
    assert abs(fx / f_true - 1) < 0.01 and abs(fy / f_true - 1) < 0.01
    assert cal.camera.rms_px < 0.5 and cal.camera.coverage >= 0.75


def test_belt_homography_residual_below_1mm_across_the_belt(calibrated):
    cfg, cal = calibrated
    # calibrated frame: x from the view's upstream edge, y from the belt edge (target laid 60 mm in)
    err, n = _belt_error_mm(cfg)
    assert n > 80
    print(f"belt homography: max error {err:.3f} mm over {n} points across the belt")
    assert err < 1.0, err


def test_encoder_scale_within_half_percent(calibrated):
    _, cal = calibrated
    print(f"encoder scale error: {100 * (cal.encoder.mm_per_count / TRUE_MPC - 1):+.4f} %")
    assert abs(cal.encoder.mm_per_count / TRUE_MPC - 1) < 0.005


def test_diverter_positions_and_latencies(calibrated):
    cfg, cal = calibrated
    x0 = _x_origin(cfg)
    for d in cal.diverters.diverters:
        print(f"diverter {d.id}: position error {d.position_mm - (TRUE_POS[d.id] - x0):+.2f} mm, "
              f"latency error {d.latency_ms - TRUE_LAT[d.id]:+.2f} ms")
        assert abs(d.position_mm - (TRUE_POS[d.id] - x0)) < 2.0, (d.id, d.position_mm, TRUE_POS[d.id] - x0)
        assert abs(d.latency_ms - TRUE_LAT[d.id]) < 2.0, (d.id, d.latency_ms)
        assert d.repeats == 3


def test_mis_set_station_sorts_again_after_calibration(calibrated):
    from station.simrun import run_fast

    cfg, cal = calibrated
    # run_fast loads the active calibration itself, as `kozan run` does
    # (30 items: ≥ 0.99 means not one of them mis-sorted or missed, as it would with 60)
    rep = run_fast(cfg, N_ITEMS, seed=3, oracle=True)
    # and the same station without its calibration does sort worse
    bare = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"path": "/nonexistent/cal.yaml"})})
    rep0 = run_fast(bare, N_ITEMS, seed=3, oracle=True)
    print(f"mis-set station, {N_ITEMS} items: before calibration purity {rep0['purity']} recovery "
          f"{rep0['recovery']} fire error p50 {rep0['fire_error_mm']['p50']} mm; after purity {rep['purity']} "
          f"recovery {rep['recovery']} fire error p50 {rep['fire_error_mm']['p50']} mm")
    assert rep["purity"] >= 0.99 and rep["recovery"] >= 0.99, rep
    assert (rep0["recovery"] or 0.0) < rep["recovery"] or (rep0["purity"] or 0.0) < rep["purity"], rep0


def test_check_history_and_rollback(calibrated, tmp_path, capsys):
    cfg, cal = calibrated
    cfgp = str(Path(cfg.calibration.path).parent / "station.yaml")
    assert main(["calibrate", "check", "-c", cfgp]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out
    assert main(["calibrate", "history", "-c", cfgp]) == 0
    assert re.search(r"\* v4 .*camera,belt,encoder,diverters", capsys.readouterr().out)
    # roll back to v3 (no diverters): a new active version, older ones kept
    store = CalibrationStore.from_config(cfg)
    new = store.rollback(3)
    assert new.version == 5 and new.diverters is None and new.encoder is not None
    assert [v.version for v in store.versions()] == [1, 2, 3, 4, 5]
    store.rollback(4)   # leave the module's calibration as it was


def test_invalid_calibration_is_refused_with_what_to_remeasure(tmp_path):
    cfg = config_from_dict({"calibration": {"path": str(tmp_path / "a.yaml"), "history_dir": str(tmp_path / "h")}})
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"belt": {"method": "x", "homography": [[0, 0, 0]] * 3,
                                                              "undistorted": False, "image_size": [1280, 720],
                                                              "residual_rms_mm": 0.1, "residual_max_mm": 0.2,
                                                              "points": 40}}))
    from station.assembly import geometry_from_config
    with pytest.raises(ConfigError, match="kozan calibrate belt"):
        geometry_from_config(cfg)


def test_sim_without_file_uses_configured_scale_and_real_camera_is_refused(tmp_path):
    from station.assembly import geometry_from_config
    cfg = config_from_dict({"calibration": {"path": str(tmp_path / "none.yaml")}})
    g = geometry_from_config(cfg)
    assert np.allclose(g.px_to_mm(np.array([[180.0, 90.0]])), [[100.0, 50.0]])
    real = config_from_dict({"camera": {"source": "opencv:0"}, "calibration": {"path": str(tmp_path / "none.yaml")}})
    with pytest.raises(ConfigError, match="kozan calibrate camera"):
        geometry_from_config(real)


def test_bad_data_exits_nonzero_with_the_reason_and_writes_nothing(tmp_path, capsys):
    cfgp = str(_write_cfg(tmp_path))
    # encoder tracking before any belt calibration: refused with the reason
    assert main(["calibrate", "encoder", "-c", cfgp, "--yes"]) == 2
    assert "run `kozan calibrate belt` first" in capsys.readouterr().out
    # camera calibration from too few views: what is wrong and what to do
    assert main(["calibrate", "camera", "-c", cfgp, "--yes", "--views", "3"]) == 3
    out = capsys.readouterr().out
    assert "NOT GOOD ENOUGH" in out and "only 3 usable views (need ≥ 8)" in out
    # belt calibration with the target out of the camera's view
    assert main(["calibrate", "belt", "-c", cfgp, "--yes", "--sim-x-mm", "2000"]) == 3
    assert "the target was not found in any image" in capsys.readouterr().out
    # a tape-measure encoder run where the belt did not move
    assert main(["calibrate", "encoder", "-c", cfgp, "--yes", "--distance-mm", "500", "--counts", "7", "7"]) == 3
    assert "did the belt move?" in capsys.readouterr().out
    assert not (tmp_path / "active.yaml").exists()


def test_target_png_and_pdf_at_physical_scale(tmp_path):
    assert main(["calibrate", "target", "--out", str(tmp_path), "--dpi", "200"]) == 0
    pdf = next(tmp_path.glob("*.pdf")).read_bytes()
    m = re.search(rb"/MediaBox \[0 0 ([\d.]+) ([\d.]+)\]", pdf)
    w_mm, h_mm = float(m.group(1)) / 72 * 25.4, float(m.group(2)) / 72 * 25.4
    assert abs(w_mm - (360 + 20)) < 0.01 and abs(h_mm - (240 + 20)) < 0.01
    import cv2
    from calibration.targets import TargetDetector, TargetSpec
    img = cv2.imread(str(next(tmp_path.glob("*.png"))))
    det = TargetDetector(TargetSpec()).detect(img)
    ppm = 200 / 25.4
    assert det is not None and len(det) == 77
    assert np.abs((det.px + 0.5) / ppm - 10.0 - det.obj_mm).max() < 0.25   # within a pixel at 200 dpi (board size rounds to whole pixels)


def test_true_camera_pixel_grid_matches_exact_undistortion():
    """The renderer's per-pixel lens field is interpolated between exactly undistorted lattice points:
    it must agree with undistorting each pixel to far better than the targets need (1e-2 px)."""
    tc = TrueCamera(_truth_camera(), 1280, 720)
    gx, gy = tc.norm_grids()
    rng = np.random.default_rng(0)
    u = np.r_[rng.integers(0, 1280, 400), 0, 1279, 0, 1279, GRID_STEP_PX // 2]
    v = np.r_[rng.integers(0, 720, 400), 0, 0, 719, 719, GRID_STEP_PX // 2]
    exact = tc._undistort(np.c_[u, v].astype(np.float64))
    err_px = np.hypot(gx[v, u] - exact[:, 0], gy[v, u] - exact[:, 1]) * tc.K[0, 0]
    assert err_px.max() < 1e-2, err_px.max()


# ---- the tools as a technician meets them: image folders, check, confirmation, roll-back ----------------------
def _station_copy(cfg, tmp: Path) -> Path:
    """A second station with the same truth and a copy of the calibrated station's active file (so a test
    can change or replace it without touching the module's calibration)."""
    cfgp = _write_cfg(tmp)
    (tmp / "active.yaml").write_bytes(Path(cfg.calibration.path).read_bytes())
    return cfgp


def _edit_active(cfgp: Path, change) -> None:
    active = cfgp.parent / "active.yaml"
    data = yaml.safe_load(active.read_text())
    change(data)
    active.write_text(yaml.safe_dump(data, sort_keys=False))


def _belt_error_mm(cfg) -> tuple[float, int]:
    """Max error of the station's pixel → mm against the true camera, over a grid across the whole belt."""
    geom = station_geometry(cfg)
    tc = TrueCamera(cfg.sim.true_camera, 1280, 720)
    xs, ys = np.meshgrid(np.linspace(40, 660, 15), np.linspace(0, cfg.line.belt_width_mm, 9))
    pts = np.c_[xs.ravel(), ys.ravel()]
    px = tc.belt_to_px(pts)
    inside = (px[:, 0] >= 0) & (px[:, 0] < 1280) & (px[:, 1] >= 0) & (px[:, 1] < 720)
    err = np.linalg.norm(geom.px_to_mm(px[inside]) - (pts[inside] - [_x_origin(cfg), 0.0]), axis=1)
    return float(err.max()), int(inside.sum())


def test_camera_calibration_from_an_image_folder(tmp_path, capsys):
    import cv2
    from calibration.targets import TargetSpec
    from station.config import load_config
    from station.simline.calib_scene import CalibScene

    cfgp = _write_cfg(tmp_path)
    cfg = load_config(str(cfgp))
    folder = tmp_path / "views"
    folder.mkdir()
    for i, img in enumerate(CalibScene(cfg, TargetSpec(), seed=7).camera_views(12)):
        assert cv2.imwrite(str(folder / f"view_{i:02d}.png"), img)
    assert main(["calibrate", "camera", "-c", str(cfgp), "--yes", "--images", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"from the images in {folder}" in out and "Aim for" not in out     # worded for a folder
    cam = CalibrationStore.from_config(cfg).load().camera
    assert cam.source == f"images {folder}" and cam.views == 12
    f_true = cfg.sim.true_camera.fx
    fx, fy = cam.camera_matrix[0][0], cam.camera_matrix[1][1]
    print(f"camera from an image folder (12 PNGs): focal error fx {100 * (fx / f_true - 1):+.3f} %, "
          f"fy {100 * (fy / f_true - 1):+.3f} %, RMS {cam.rms_px:.3f} px")
    assert abs(fx / f_true - 1) < 0.01 and abs(fy / f_true - 1) < 0.01


def test_belt_report_names_the_bands_it_did_not_measure(calibrated, tmp_path, capsys):
    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)
    # one placement of a 240 mm target on a 400 mm belt: the far band has no corners, and the report says so
    assert main(["calibrate", "belt", "-c", str(cfgp), "--yes"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"y 300–400 mm\s+no points — lay the target here too", out), out
    assert "no target corners across y 300–400 mm" in out and "second placement" in out
    for band in ("0–100", "100–200", "200–300"):
        assert re.search(rf"y\s+{band} mm\s+\d+\.\d+ mm", out), band
    # a second placement, slid across to the far edge: every band is measured
    assert main(["calibrate", "belt", "-c", str(cfgp), "--yes", "--sim-second-y-mm", "160"]) == 0
    out = capsys.readouterr().out
    assert "no points" not in out and "placements                    2" in out
    for band in ("0–100", "100–200", "200–300", "300–400"):
        assert re.search(rf"y\s+{band} mm\s+\d+\.\d+ mm", out), band
    from station.config import load_config
    cfg2 = load_config(str(cfgp))
    belt = CalibrationStore.from_config(cfg2).load().belt
    assert [round(y) for y, _ in belt.residual_by_width_mm] == [50, 150, 250, 350]
    err, n = _belt_error_mm(cfg2)
    print(f"belt, two placements: residual max {belt.residual_max_mm:.3f} mm in 4/4 bands; "
          f"true error max {err:.3f} mm over {n} points across the belt")
    assert err < 1.0


def test_belt_from_an_image_folder_with_two_placements(calibrated, tmp_path, capsys):
    import cv2
    from calibration.targets import TargetSpec
    from station.config import load_config
    from station.simline.calib_scene import CalibScene

    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)
    folder = tmp_path / "belt"
    folder.mkdir()
    scene = CalibScene(cfg, TargetSpec(), seed=3)
    # the first at the measured place (--target-y-mm 60); the second slid across and turned a little
    cv2.imwrite(str(folder / "a_near.png"), scene.render_on_belt(150.0, 60.0))
    cv2.imwrite(str(folder / "b_far.png"), scene.render_on_belt(190.0, 158.0, -0.02))
    assert main(["calibrate", "belt", "-c", str(cfgp), "--yes", "--images", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "no points" not in out
    err, n = _belt_error_mm(load_config(str(cfgp)))
    print(f"belt from an image folder, two placements: true error max {err:.3f} mm over {n} points")
    assert err < 1.0


def test_check_calls_a_stale_calibration_a_warning(calibrated, tmp_path, capsys):
    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)

    def age(data):
        for s in ("camera", "belt", "encoder", "diverters"):
            data[s]["measured_at"] = "2020-01-01T00:00:00+00:00"
    _edit_active(cfgp, age)
    assert main(["calibrate", "check", "-c", str(cfgp)]) == 0      # stale: still usable, exit 0
    out = capsys.readouterr().out
    for tool in ("camera", "belt", "encoder", "diverters"):
        assert re.search(rf"\[warning\] {tool}: stale: measured 2020-01-01.*re-run `kozan calibrate {tool}`", out), tool
    assert "[error]" not in out
    # the method text is wrapped, not cut
    method = CalibrationStore.from_config(cfg).load().diverters.method
    assert len(method) > 70
    assert method.split()[-1] in out and " ".join(out.split()).count(" ".join(method.split())) == 1


def test_check_calls_an_out_of_tolerance_calibration_an_error(calibrated, tmp_path, capsys):
    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)

    def worsen(data):
        data["belt"]["residual_max_mm"] = 1.7
        data["camera"]["rms_px"] = 1.4
    _edit_active(cfgp, worsen)
    assert main(["calibrate", "check", "-c", str(cfgp)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\[error\] belt: residual 1\.70 mm exceeds the tolerance 1\.0 mm.*re-run `kozan calibrate belt`",
                     out), out
    assert re.search(r"\[error\] camera: reprojection error 1\.40 px.*re-run `kozan calibrate camera`", out), out
    # and the station refuses it the same way
    assert main(["sim", "--fast", "--oracle", "--items", "3", "-q", "-c", str(cfgp)]) == 2
    err = capsys.readouterr().err
    assert "residual 1.70 mm exceeds" in err and "kozan calibrate belt" in err and "kozan calibrate camera" in err


def test_answering_no_keeps_the_old_calibration(calibrated, tmp_path, capsys, monkeypatch):
    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)
    before = (tmp_path / "active.yaml").read_bytes()
    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "n")
    assert main(["calibrate", "belt", "-c", str(cfgp)]) != 0
    assert "not written" in capsys.readouterr().out
    assert len(asked) == 1 and "[y/N]" in asked[0] and "old one is kept" in asked[0]
    assert (tmp_path / "active.yaml").read_bytes() == before
    assert not (tmp_path / "history").exists() or not any((tmp_path / "history").iterdir())


def test_rollback_from_the_command_line(calibrated, tmp_path, capsys, monkeypatch):
    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)
    cal = yaml.safe_load((tmp_path / "active.yaml").read_text())    # (an earlier test rolled the module's file)
    v_old = cal["version"]
    # a new belt calibration (from another target placement) becomes the next version; the old one is kept
    assert main(["calibrate", "belt", "-c", str(cfgp), "--yes", "--target-y-mm", "70", "--sim-x-mm", "180"]) == 0
    assert main(["calibrate", "history", "-c", str(cfgp)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"  v{v_old} ", out) and re.search(rf"\* v{v_old + 1} ", out), out
    # roll back, but answer "n": nothing changes
    monkeypatch.setattr("builtins.input", lambda prompt="": "n")
    before = (tmp_path / "active.yaml").read_bytes()
    assert main(["calibrate", "history", "-c", str(cfgp), "--rollback", str(v_old)]) == 1
    assert (tmp_path / "active.yaml").read_bytes() == before
    # roll back for real: the old homography is active again, as a new version; nothing is lost
    monkeypatch.setattr("builtins.input", lambda prompt="": "y")
    assert main(["calibrate", "history", "-c", str(cfgp), "--rollback", str(v_old)]) == 0
    assert f"version {v_old} is active again (as version {v_old + 2})" in capsys.readouterr().out
    store = CalibrationStore.from_config(cfg.model_copy(update={"calibration": cfg.calibration.model_copy(
        update={"path": str(tmp_path / "active.yaml"), "history_dir": str(tmp_path / "history")})}))
    now = store.load()
    assert now.version == v_old + 2 and now.belt.homography == cal["belt"]["homography"]
    assert [v.version for v in store.versions()] == [v_old, v_old + 1, v_old + 2]
    # an unknown version is refused with the versions there are
    assert main(["calibrate", "history", "-c", str(cfgp), "--rollback", "99", "--yes"]) == 2
    assert f"no calibration version 99; versions on disk: [{v_old}, {v_old + 1}, {v_old + 2}]" in capsys.readouterr().out


def test_diverter_tool_refuses_a_real_station_saying_what_it_needs(calibrated, tmp_path, capsys):
    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)
    before = (tmp_path / "active.yaml").read_bytes()
    assert main(["calibrate", "diverters", "-c", str(cfgp), "--yes", "--set", "camera.source=opencv:0"]) == 2
    out = capsys.readouterr().out
    assert "light gate at each diverter" in out and "serial protocol" in out and "diverters[].position_mm" in out
    assert (tmp_path / "active.yaml").read_bytes() == before


def test_diverter_measurement_goes_through_the_serial_link_gate_events(calibrated, tmp_path, monkeypatch, capsys):
    """The simulated line is measured like a real station: the gate and actuator-sensor edges reach the tool
    only as InputEdge events over the pty from the firmware simulator, and the firing as its Fired event."""
    from calibration import diverters
    from firmware_bridge.events import FiredEvent, InputEdgeEvent

    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)
    seen: list = []
    real_poll = diverters.EventWatch.drain

    def drain(self):
        orig = self.link.poll_events

        def poll():
            evs = orig()
            seen.extend(evs)
            return evs
        self.link.poll_events = poll
        try:
            real_poll(self)
        finally:
            self.link.poll_events = orig
    monkeypatch.setattr(diverters.EventWatch, "drain", drain)
    assert main(["calibrate", "diverters", "-c", str(cfgp), "--yes", "--diverter", "2", "--repeats", "3"]) == 0
    gate = [(e.rising, e.count) for e in seen if isinstance(e, InputEdgeEvent) and e.input == 4]
    sensor = [e for e in seen if isinstance(e, InputEdgeEvent) and e.input == 5 and e.rising]
    fired = [e for e in seen if isinstance(e, FiredEvent)]
    assert [r for r, _ in gate] == [True, False] * 3, gate          # blocked, clear: once per pass
    assert len(sensor) == 3 and len(fired) == 3
    lat = sorted((s.mcu_time_us - f.mcu_time_us) / 1000 for s, f in zip(sensor, fired))
    assert all(abs(x - TRUE_LAT[2]) < 2.0 for x in lat), lat
    d2 = CalibrationStore(tmp_path / "active.yaml", tmp_path / "history").load().diverters.diverters
    assert [d.id for d in d2] == [2]
    assert abs(d2[0].position_mm - (TRUE_POS[2] - _x_origin(cfg))) < 2.0
    assert "MCU-stamped light gate" in CalibrationStore(tmp_path / "active.yaml", tmp_path / "history").load().diverters.method


def test_diverter_tool_names_the_gate_input_that_stays_silent(calibrated, tmp_path, capsys):
    cfg, _ = calibrated
    cfgp = _station_copy(cfg, tmp_path)
    before = (tmp_path / "active.yaml").read_bytes()
    assert main(["calibrate", "diverters", "-c", str(cfgp), "--yes", "--diverter", "1", "--repeats", "3",
                 "--inputs", "1:12:3"]) == 2
    out = capsys.readouterr().out
    assert "diverter 1: no edge from its light gate (input 12)" in out and "--inputs" in out
    assert (tmp_path / "active.yaml").read_bytes() == before
