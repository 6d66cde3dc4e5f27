"""The station refuses a calibration it cannot use — cleanly: `kozan run` and `kozan sim` exit non-zero
with what is wrong, which file, and which tool to re-run; no traceback, and nothing opened first."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from calibration.store import CalibrationError
from station.cli import main

REPO = Path(__file__).resolve().parents[2]

_BELT = {"method": "charuco, 1 placement", "undistorted": False, "image_size": [1280, 720],
         "residual_rms_mm": 0.1, "residual_max_mm": 0.2, "points": 77}
_SCALE = [[1 / 1.8, 0, 0], [0, 1 / 1.8, 0], [0, 0, 1]]      # the simulated camera's true px -> mm
BAD = {
    # the file's own validation refuses it
    "singular": {"homography": [[0, 0, 0]] * 3},
    # valid on its face, but its residual is beyond calibration.max_belt_residual_mm (1 mm)
    "out of tolerance": {"homography": _SCALE, "residual_max_mm": 2.5},
    # passes the file's check (|det| > 1e-15) but is numerically singular for the geometry (< 1e-12)
    "nearly singular": {"homography": [[1e-5, 0, 0], [0, 1e-5, 0], [0, 0, 1e-3]]},
}


def _station(tmp: Path, case: str) -> Path:
    (tmp / "active.yaml").write_text(yaml.safe_dump({"belt": {**_BELT, **BAD[case]}}))
    cfg = {"calibration": {"path": str(tmp / "active.yaml"), "history_dir": str(tmp / "history")},
           "records": {"path": str(tmp / "records.sqlite")}}
    p = tmp / "station.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _assert_refusal(text: str, cal: Path) -> None:
    assert "Traceback" not in text, text
    assert "kozan calibrate belt" in text, text           # what to re-measure
    assert str(cal) in text, text                         # which file
    assert "the station will not run on this calibration" in text, text


@pytest.mark.parametrize("case", sorted(BAD))
def test_sim_fast_refuses_a_bad_calibration_cleanly(tmp_path, capsys, case):
    cfg = _station(tmp_path, case)
    rc = main(["sim", "--fast", "--oracle", "--items", "3", "-q", "-c", str(cfg)])
    out, err = capsys.readouterr()
    assert rc != 0
    _assert_refusal(out + err, tmp_path / "active.yaml")
    what = {"singular": "non-singular", "out of tolerance": "exceeds the tolerance",
            "nearly singular": "singular"}[case]
    assert what in err
    print(f"{case}: exit {rc}; " + " | ".join(err.strip().splitlines()[1:-1]))


def test_run_refuses_a_bad_calibration_before_opening_anything(tmp_path, capsys):
    cfg = _station(tmp_path, "out of tolerance")
    rc = main(["run", "--duration", "1", "-c", str(cfg)])
    out, err = capsys.readouterr()
    assert rc != 0
    _assert_refusal(out + err, tmp_path / "active.yaml")
    assert "residual 2.50 mm exceeds the tolerance 1.0 mm" in err
    assert not (tmp_path / "records.sqlite").exists()      # refused before the station was built


def test_run_fast_raises_calibration_error_before_opening_records(tmp_path):
    from station.config import load_config
    from station.simrun import run_fast

    cfg = load_config(str(_station(tmp_path, "singular")))
    with pytest.raises(CalibrationError, match="kozan calibrate belt"):
        run_fast(cfg, 3, oracle=True, records_path=tmp_path / "r.sqlite")
    assert not (tmp_path / "r.sqlite").exists()


@pytest.mark.parametrize("cmd", [["sim", "--fast", "--oracle", "--items", "3", "-q"], ["run", "--duration", "2"]])
def test_command_line_exits_non_zero_without_a_traceback(tmp_path, cmd):
    cfg = _station(tmp_path, "singular")
    r = subprocess.run([sys.executable, "-m", "station.cli", *cmd, "-c", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    _assert_refusal(r.stdout + r.stderr, tmp_path / "active.yaml")
    assert "--rollback" in r.stderr                      # and how to get the last good one back
