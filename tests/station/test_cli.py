import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def kozan(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "station.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_sim_json_has_what_the_issue_asks_for():
    r = kozan("sim", "--items", "12", "--seed", "4", "--fast", "--json", "--oracle", "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for key in ("items", "purity", "recovery", "missed", "per_bin", "per_class", "frames", "wall_s"):
        assert key in rep
    assert rep["items"] == 12
    assert set(rep["per_bin"]) == {"0", "1", "2", "3", "4"}
    assert all({"purity", "recovery"} <= set(v) for v in rep["per_bin"].values())


def test_bad_config_exits_2_with_the_key_named(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("line:\n  belt_speed_mm_s: fast\n")
    r = kozan("config", "--config", str(cfg))
    assert r.returncode == 2
    assert "line.belt_speed_mm_s" in r.stderr and "'fast'" in r.stderr


def test_set_override_is_validated():
    r = kozan("config", "--set", "camera.fps=-1")
    assert r.returncode == 2 and "camera.fps" in r.stderr


def test_run_shows_the_line_working_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "station.cli", "run", "--set",
                          f"records.path={tmp_path / 'r.sqlite'}", "--set", "sim.items_per_min=400"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        assert p.stdout is not None
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "[running]" in line and " items " in line:
                n = int(line.split(" items ")[1].split()[0])
                if n >= 3:
                    break
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["decided"] >= 3 and summary["frames"] > 0, (lines, out)
