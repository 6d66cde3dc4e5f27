"""Detector speed on the same frames and model: raw session.run vs the station's detector
(letterbox + run + decode + NMS) vs ultralytics' predict (when the train extra is installed).

    .venv/bin/python bench/detector.py [--model models/active.onnx] [--frames 200] [--threads N] [--rounds 1]
                                       [--spin never|run|always] [--opencv-threads 2]

Frames are 1280x720 renders of the simulated line with real items in them (the station's own
camera). Prints per-frame median and p99 (ms), the mean detections per frame of each path, the
ratios between the paths and the thread settings of each. The paths are timed interleaved, frame
by frame in rotating order, so that a machine shared with other work loads them all alike; every
onnxruntime session runs with the same intra-op thread count and spin setting (ultralytics' own
default is one thread per physical core, spinning; the bench replaces its session with one set like
the station's and says so). Thread settings default to the station's configuration (`detector.*`).

`raw_session_run_spinning` is the same model with onnxruntime's default thread count (one per
physical core) and its workers spinning inside the run: the model's own speed, as `kozan model eval`
and the gate measure it. Its workers stop spinning when the run returns (`spin=run`): onnxruntime's
own default (`always`) spins on after it and slows whichever path is timed next (measured: a
2-thread session timed after two such sessions took 0.5 ms longer). In this tight loop, with
nothing beside it, it is faster than the station's session, which the station still runs because
beside its capture and looks threads it drops fewer frames on 2 cores (MODEL_CARD.md, "Thread
settings"). Benchmarks measure; tests never assert speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from station.assembly import detector_settings  # noqa: E402
from station.clock import VirtualClock  # noqa: E402
from station.config import StationConfig  # noqa: E402
from station.simline.camera import SimCamera  # noqa: E402
from station.simline.world import BeltWorld  # noqa: E402
from vision.detector import SPIN_MODES, Detector, make_session  # noqa: E402


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


def stats(ms: np.ndarray) -> dict[str, float]:
    return {"median_ms": round(float(np.median(ms)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(np.mean(ms)), 2)}


def interleaved(paths: dict[str, Callable[[np.ndarray], object]], imgs: list[np.ndarray], warmup: int,
                rounds: int) -> dict[str, np.ndarray]:
    """Per-frame times of every path, taken frame by frame in rotating order, so that every path
    sees the same machine load (a background job that comes and goes cannot favour one of them)."""
    names = list(paths)
    for im in imgs[:warmup]:
        for n in names:
            paths[n](im)
    ts: dict[str, list[float]] = {n: [] for n in names}
    k = 0
    for _ in range(rounds):
        for im in imgs:
            order = names[k % len(names):] + names[:k % len(names)]
            k += 1
            for n in order:
                t0 = time.perf_counter()
                paths[n](im)
                ts[n].append(time.perf_counter() - t0)
    return {n: np.asarray(v) * 1000 for n, v in ts.items()}


def _ultralytics_session(model) -> object | None:
    """The onnxruntime session inside an ultralytics YOLO predictor (its attribute path moves between releases)."""
    import onnxruntime as ort

    seen: set[int] = set()
    stack = [model.predictor.model]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, ort.InferenceSession):
            return o
        for attr in ("session", "backend", "model"):
            v = getattr(o, attr, None)
            if v is not None and not isinstance(v, (str, int, float)):
                stack.append(v)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/active.onnx")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1, help="passes over the frames")
    station = StationConfig()
    in_run = detector_settings(station)         # what `kozan run` resolves `auto` to on this machine
    ap.add_argument("--threads", type=int, default=in_run["threads"],
                    help="onnxruntime intra-op threads, every path (default: the station's in `kozan run`)")
    ap.add_argument("--spin", choices=SPIN_MODES, default=in_run["spin"],
                    help="onnxruntime's busy-waiting, every path (default: the station's in `kozan run`)")
    ap.add_argument("--opencv-threads", type=int, default=station.detector.opencv_threads,
                    help="OpenCV's worker threads (default: the station's detector.opencv_threads)")
    ap.add_argument("--no-ultralytics", action="store_true")
    a = ap.parse_args()
    cv2.setNumThreads(a.opencv_threads)
    imgs = frames(a.frames)
    det = Detector(a.model, threads=a.threads, spin=a.spin)
    a.model = str(det.path)          # models/active.onnx -> the registry's active version's file
    tensor = det.prepare(imgs[0]).copy()
    name = det.session.get_inputs()[0].name
    h, w = det.info.input_hw
    paths: dict[str, Callable[[np.ndarray], object]] = {
        "raw_session_run": lambda im: det.session.run(None, {name: tensor}),
        "station_detector": det,
    }
    spinning = make_session(det.path, 0, "run")     # 0: onnxruntime picks (a thread per physical core)
    paths["raw_session_run_spinning"] = lambda im: spinning.run(None, {name: tensor})
    n_det = {"station_detector": float(np.mean([len(det(im)) for im in imgs]))}
    threads: dict[str, object] = {"onnxruntime_intra_op": a.threads, "onnxruntime_spin": a.spin,
                                  "opencv": cv2.getNumThreads(),
                                  "raw_session_run_spinning": "intra-op 0 (one per physical core), spin run"}
    skipped = None
    if not a.no_ultralytics:
        try:
            os.environ.setdefault("YOLO_OFFLINE", "1")
            os.environ.setdefault("YOLO_AUTOINSTALL", "False")
            from vision.training import _offline_ultralytics

            ul = _offline_ultralytics(Path("runs/ultralytics-config").resolve(), a.threads)
            import torch

            m = ul.YOLO(a.model, task="detect")

            def predict(im):
                return m.predict(im, imgsz=(h, w), verbose=False, conf=det.conf, iou=det.iou, device="cpu")

            predict(imgs[0])
            sess = _ultralytics_session(m)
            ul_threads = sess.get_session_options().intra_op_num_threads if sess is not None else "unknown"
            if sess is not None:
                # ultralytics opens onnxruntime with default options (intra-op 0: one per physical core,
                # spinning); give it the station's session settings so that the comparison is fair
                new = make_session(Path(a.model), a.threads, a.spin)
                for holder in _holders_of(m.predictor.model, sess):
                    holder.session = new
                sess = _ultralytics_session(m)
                ul_threads = (f"{sess.get_session_options().intra_op_num_threads}, spin {a.spin} "
                              f"(ultralytics' default {ul_threads}, spin always, replaced)")
            threads["ultralytics"] = {"onnxruntime_intra_op": ul_threads, "torch": torch.get_num_threads()}
            paths["ultralytics_predict"] = predict
            n_det["ultralytics_predict"] = float(np.mean([len(predict(im)[0].boxes) for im in imgs]))
        except Exception as e:  # the train extra is optional
            skipped = f"{type(e).__name__}: {e}"
    times = interleaved(paths, imgs, warmup=10, rounds=a.rounds)
    res: dict[str, dict] = {k: stats(v) for k, v in times.items()}
    if skipped:
        res["ultralytics_predict"] = {"skipped": skipped}
    base = res["raw_session_run"]["median_ms"]
    ratios = {f"{k}/raw_session_run": round(v["median_ms"] / base, 3) for k, v in res.items() if "median_ms" in v}
    if "median_ms" in res.get("ultralytics_predict", {}):
        for q in ("median_ms", "p99_ms"):
            ratios[f"station_detector/ultralytics_predict ({q[:-3]})"] = round(
                res["station_detector"][q] / res["ultralytics_predict"][q], 3)
    out = {"model": a.model, "model_version": det.info.version, "input_hw": det.info.input_hw,
           "frames": len(imgs), "frame_size": list(imgs[0].shape[:2]), "rounds": a.rounds,
           "mean_detections_per_frame": n_det, "conf": det.conf, "nms_iou": det.iou,
           "threads": threads, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
           "results": res, "ratios_median": ratios}
    print(f"model {a.model} ({det.info.version}, input {h}x{w}); {len(imgs)} frames "
          f"{imgs[0].shape[1]}x{imgs[0].shape[0]}, {a.rounds} round(s), paths interleaved frame by frame")
    print(f"threads: {threads}; load average {os.getloadavg()}")
    print(f"mean detections per frame: {n_det}")
    for k, v in res.items():
        print(f"{k:<22} {v}")
    print(f"ratios: {ratios}")
    print(json.dumps(out))
    return 0


def _holders_of(root, target) -> list:
    """Objects reachable from `root` whose `session` attribute is `target`."""
    seen: set[int] = set()
    stack, found = [root], []
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if getattr(o, "session", None) is target:
            found.append(o)
        for attr in ("backend", "model"):
            v = getattr(o, attr, None)
            if v is not None:
                stack.append(v)
    return found


if __name__ == "__main__":
    raise SystemExit(main())
