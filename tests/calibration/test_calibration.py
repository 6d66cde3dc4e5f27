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
    geom = station_geometry(cfg)
    tc = TrueCamera(cfg.sim.true_camera, 1280, 720)
    xs, ys = np.meshgrid(np.linspace(40, 660, 15), np.linspace(0, cfg.line.belt_width_mm, 9))
    pts = np.c_[xs.ravel(), ys.ravel()]
    px = tc.belt_to_px(pts)
    inside = (px[:, 0] >= 0) & (px[:, 0] < 1280) & (px[:, 1] >= 0) & (px[:, 1] < 720)
    assert inside.sum() > 80
    # calibrated frame: x from the view's upstream edge, y from the belt edge (target laid 60 mm in)
    err = np.linalg.norm(geom.px_to_mm(px[inside]) - (pts[inside] - [_x_origin(cfg), 0.0]), axis=1)
    print(f"belt homography: max error {err.max():.3f} mm over {inside.sum()} points across the belt")
    assert err.max() < 1.0, err.max()


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
