"""The running station under each onnxruntime thread setting: frames dropped, latency and CPU.

    .venv/bin/python bench/loop_threads.py [--settings always/2 never/2 run/2 never/1] [--rounds 2]
                                           [--duration 40] [--fps 60]

Why a bench of the whole station: how onnxruntime's workers wait for work decides how the
detector shares 2 cores with the capture, looks and link threads, and a detector timed alone
cannot show it. Alone, a spinning session runs faster (`bench/detector.py`); in the station,
spinning workers hold the cores that capture and the inspectors need.

What it runs: `kozan run` in real time, one fresh process per setting. The camera is a replayed
MJPG video of the simulated line (`camera.source=file:`, decoded like a USB camera's stream;
rendered once and kept under runs/bench/). The diverter MCU is the firmware simulator on a real
pty, in a process of its own. The station runs on a calibration that `kozan calibrate` makes
against the simulated camera, in a temporary folder. Both inspectors are on and the HMI is off.
A setting is `detector.spin` / `detector.intra_op_threads` (with 1 thread onnxruntime has no
workers to spin, so `never/1` stands for every spin). Settings are interleaved round by round, so
a machine whose load drifts weighs on all of them.

Prints per run: frames processed, frames dropped (replaced before the loop took them), the mean of
the station's once-a-second latency p50 (capture to decisions), and the CPU seconds of the station
process. Then per setting the medians, as ratios to the first setting (onnxruntime's default,
`always/2`, unless told otherwise), which is the baseline measured in the same run. OpenCV's threads
come from the configuration (2 by default). Benchmarks measure; tests never assert speed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from station.cli import main as kozan  # noqa: E402
from station.clock import VirtualClock  # noqa: E402
from station.config import StationConfig  # noqa: E402
from station.simline.camera import SimCamera  # noqa: E402
from station.simline.world import BeltWorld  # noqa: E402

LATENCY = re.compile(r"latency\s+([0-9.]+)ms")


def line_video(path: Path, fps: float, seconds: float, seed: int = 5) -> Path:
    """The simulated line's camera, rendered once at `fps` into an MJPG file (kept for later runs)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = StationConfig()
    clock = VirtualClock()
    world = BeltWorld(cfg, clock, n_items=400, seed=seed)
    cam = SimCamera(cfg, world, clock, seed=seed)
    part = path.with_suffix(".part.avi")
    out = cv2.VideoWriter(str(part), cv2.VideoWriter_fourcc(*"MJPG"), fps, (cfg.camera.width, cfg.camera.height))
    for k in range(int(fps * seconds)):
        t = k / fps
        clock.advance_to(t)
        out.write(cam.render_at(t).image)
        world.settle()
    out.release()
    part.rename(path)
    return path


def calibrate(folder: Path) -> Path:
    """A station config whose calibration `kozan calibrate` measured on the simulated camera."""
    cfgp = folder / "station.yaml"
    cfgp.write_text(yaml.safe_dump({"calibration": {"path": str(folder / "active.yaml"),
                                                    "history_dir": str(folder / "history")}}))
    for args in (["camera", "--views", "10"], ["belt"], ["encoder", "--frames", "8"], ["diverters", "--repeats", "3"]):
        if kozan(["calibrate", *args, "-c", str(cfgp), "--yes"]) != 0:
            raise SystemExit(f"kozan calibrate {args[0]} failed: see above")
    return cfgp


def run_station(cfgp: Path, video: Path, spin: str, threads: int, duration: float, fps: float) -> dict:
    """One `kozan run` on the replayed video beside the MCU simulator; its summary, latency and CPU."""
    mcu = subprocess.Popen([sys.executable, "-m", "firmware_bridge.simulator"], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        pty = mcu.stdout.readline().strip()
        if not pty:
            raise SystemExit("the firmware simulator did not start")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-m", "station.cli", "run", "-c", str(cfgp), "--duration", str(duration),
                               "--set", f"camera.source=file:{video}", "--set", f"camera.fps={fps}",
                               "--set", "hmi.enabled=false", "--set", f"link.port={pty}",
                               "--set", f"detector.spin={spin}", "--set", f"detector.intra_op_threads={threads}"],
                              cwd=ROOT, text=True, capture_output=True, timeout=duration + 120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        mcu.terminate()
        mcu.wait(timeout=10)
    summary = next((json.loads(x) for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    if proc.returncode != 0 or summary is None:
        raise SystemExit(f"kozan run ({spin}, {threads} threads) failed with {proc.returncode}:\n{proc.stderr[-2000:]}")
    lat = [float(x) for x in LATENCY.findall(proc.stdout)]
    return {"setting": f"{spin}/{threads}", "frames": summary["frames"], "dropped_frames": summary["dropped_frames"],
            "missed": summary["missed"], "latency_p50_ms_mean": round(float(np.mean(lat)), 1) if lat else None,
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)}


def setting(text: str) -> str:
    """`spin/threads`, checked before any run starts."""
    spin, _, threads = text.partition("/")
    if spin not in ("always", "never", "run") or not threads.isdigit() or int(threads) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write spin/threads, e.g. never/1 (spin: always, never or run)")
    return f"{spin}/{int(threads)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", type=setting, default=["always/2", "never/2", "run/2", "never/1"],
                    help="spin/threads to compare; the first is the baseline of the ratios")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds per run")
    ap.add_argument("--fps", type=float, default=60.0)
    a = ap.parse_args()
    video = line_video(ROOT / "runs" / "bench" / f"line-{a.fps:g}fps.avi", a.fps, 15.0)
    runs: list[dict] = []
    names = list(dict.fromkeys(a.settings))
    with tempfile.TemporaryDirectory(prefix="kozan-bench-") as tmp:
        cfgp = calibrate(Path(tmp))
        for r in range(a.rounds):
            for name in names:
                spin, threads = name.split("/")
                res = run_station(cfgp, video, spin, int(threads), a.duration, a.fps)
                runs.append(res)
                print(f"round {r + 1}: {res}", flush=True)
    keys = ("dropped_frames", "latency_p50_ms_mean", "cpu_s")
    med = {n: {k: round(float(np.median([x[k] for x in runs if x["setting"] == n])), 2) for k in keys} for n in names}
    base = names[0]
    ratios = {n: {k: round(v[k] / med[base][k], 3) if med[base][k] else None for k in keys} for n, v in med.items()}
    for n in names:
        print(f"{n:<10} median {med[n]}  ratio to {base}: {ratios[n]}")
    print(json.dumps({"fps": a.fps, "duration_s": a.duration, "rounds": a.rounds, "cpu_count": os.cpu_count(),
                      "load_average": os.getloadavg(), "detector": StationConfig().detector.model_dump(),
                      "runs": runs, "median": med, f"ratio_to_{base}": ratios, "time": time.strftime("%FT%T")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
