"""Detector speed on the same frames and model: raw session.run vs the station's detector
(letterbox + run + decode + NMS) vs ultralytics' predict (when the train extra is installed).

    .venv/bin/python bench/detector.py [--model models/active.onnx] [--frames 200] [--threads 2]

Frames are 1280x720 renders of the simulated line with real items in them. Prints per-frame
median and p99 (ms) and the ratios between the paths, measured in the same run, and the thread
settings used. Benchmarks measure; tests never assert speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from station.clock import VirtualClock  # noqa: E402
from station.config import StationConfig  # noqa: E402
from station.simline.camera import SimCamera  # noqa: E402
from station.simline.world import BeltWorld  # noqa: E402
from vision.detector import Detector  # noqa: E402


def frames(n: int, seed: int = 3) -> list[np.ndarray]:
    cfg = StationConfig()
    clock = VirtualClock()
    world = BeltWorld(cfg, clock, n_items=n * 2, seed=seed)
    cam = SimCamera(cfg, world, clock, seed=seed)
    out = []
    k = 0
    while len(out) < n:
        t = k / 10.0
        clock.advance_to(t)
        f = cam.render_at(t)
        world.settle()
        if cam.last_truth:
            out.append(f.image)
        k += 1
    return out


def timed(fn, imgs, warmup: int = 10) -> np.ndarray:
    for im in imgs[:warmup]:
        fn(im)
    ts = []
    for im in imgs:
        t0 = time.perf_counter()
        fn(im)
        ts.append(time.perf_counter() - t0)
    return np.asarray(ts) * 1000


def stats(ms: np.ndarray) -> dict[str, float]:
    return {"median_ms": round(float(np.median(ms)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/active.onnx")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--no-ultralytics", action="store_true")
    a = ap.parse_args()
    cv2.setNumThreads(1)
    imgs = frames(a.frames)
    det = Detector(a.model, threads=a.threads)
    tensor = det.prepare(imgs[0]).copy()
    name = det.session.get_inputs()[0].name
    res: dict[str, dict] = {}
    res["raw_session_run"] = stats(timed(lambda im: det.session.run(None, {name: tensor}), imgs))
    res["station_detector"] = stats(timed(det, imgs))
    n_det = float(np.mean([len(det(im)) for im in imgs[:50]]))
    if not a.no_ultralytics:
        try:
            os.environ.setdefault("YOLO_OFFLINE", "1")
            os.environ.setdefault("YOLO_AUTOINSTALL", "False")
            from vision.training import _offline_ultralytics

            ul = _offline_ultralytics(Path("runs/ultralytics-config").resolve(), a.threads)
            m = ul.YOLO(a.model, task="detect")
            h, w = det.info.input_hw
            res["ultralytics_predict"] = stats(timed(lambda im: m.predict(im, imgsz=(h, w), verbose=False, conf=0.25,
                                                                           device="cpu"), imgs))
        except Exception as e:  # the train extra is optional
            res["ultralytics_predict"] = {"skipped": f"{type(e).__name__}: {e}"}
    base = res["raw_session_run"]["median_ms"]
    ratios = {k: round(v["median_ms"] / base, 3) for k, v in res.items() if "median_ms" in v}
    out = {"model": a.model, "input_hw": det.info.input_hw, "frames": len(imgs), "mean_detections": n_det,
           "threads": {"onnxruntime_intra_op": a.threads, "opencv": cv2.getNumThreads()},
           "results": res, "ratio_to_raw_median": ratios}
    for k, v in res.items():
        print(f"{k:<22} {v}")
    print(f"ratios to raw session.run (median): {ratios}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
