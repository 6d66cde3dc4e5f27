"""Detector architectures side by side: accuracy on the held-out set and speed on this machine.

    .venv/bin/python bench/architectures.py MODEL [MODEL ...] [--eval datasets/golden-v1.yaml]
        [--frames 150] [--threads 2]

MODEL is an exported ONNX file (trained: accuracy and speed), or `ARCH.yaml@HxW` — an architecture
with random weights exported at that input (speed only; needs the train extra), e.g.
`vision/arch/yolo11n-narrow.yaml@256x416`. The first model is the baseline: every other one is
reported as a ratio to it, measured in the same run on the same frames. Speed: bare `session.run`
on a prepared tensor and the station's detector (letterbox + run + decode + NMS), per-frame median
and p99; one model at a time in blocks, forwards then backwards through the list, so that load from
other work falls on all of them alike (interleaving sessions frame by frame makes their spinning
threads compete). Accuracy: `vision.evaluation` through the station's own
detector (COCO 101-point mAP50 / mAP50-95), as `kozan model eval` reports it. Benchmarks measure;
tests never assert speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.detector import frames, interleaved, stats  # noqa: E402
from vision.detector import Detector  # noqa: E402


def random_weights_onnx(spec: str, out_dir: Path) -> Path:
    """`ARCH.yaml@HxW` -> an ONNX file of that architecture with random weights (latency only)."""
    arch, _, size = spec.partition("@")
    h, w = (int(v) for v in size.lower().split("x"))
    from vision.training import _offline_ultralytics, set_kozan_metadata
    from vision.taxonomy import REPO_ROOT

    ul = _offline_ultralytics(REPO_ROOT / "runs" / "ultralytics-config", 2)
    import onnx

    model = ul.YOLO(str(Path(arch).resolve()), task="detect")
    cwd = os.getcwd()
    os.chdir(out_dir)                 # a model built from a yaml exports into the working directory
    try:
        produced = Path(model.export(format="onnx", imgsz=[h, w], dynamic=False, simplify=True, opset=17,
                                     nms=False, half=False, device="cpu")).resolve()
    finally:
        os.chdir(cwd)
    m = onnx.load(str(produced))
    produced.unlink()
    set_kozan_metadata(m, f"{Path(arch).stem}-random@{h}x{w}", "random", (h, w), names=_taxonomy_names())
    out = out_dir / f"{Path(arch).stem}-{h}x{w}.onnx"
    onnx.save(m, str(out))
    return out


def _taxonomy_names() -> list[str]:
    from vision.taxonomy import load_taxonomy

    return list(load_taxonomy().names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--eval", default=None, help="held-out data.yaml: accuracy of the trained models")
    ap.add_argument("--split", default="test")
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (every model)")
    a = ap.parse_args()
    cv2.setNumThreads(1)
    tmp = Path(tempfile.mkdtemp(prefix="kozan-arch-"))
    files: list[tuple[str, Path, bool]] = []
    for spec in a.models:
        if "@" in spec and spec.split("@")[0].endswith(".yaml"):
            files.append((spec, random_weights_onnx(spec, tmp), False))
        else:
            files.append((spec, Path(spec), True))
    imgs = frames(a.frames)
    dets = {spec: Detector(path, threads=a.threads) for spec, path, _ in files}
    # One model at a time, in blocks, forwards then backwards (A B C, C B A): an onnxruntime session's
    # threads spin for a while after each run, so interleaving several sessions frame by frame would
    # make them steal each other's cores (measured: a bare session.run 43 ms instead of 15).
    times: dict[str, list[float]] = {}
    for order in (list(dets), list(dets)[::-1]):
        for spec in order:
            det = dets[spec]
            tensor = det.prepare(imgs[0]).copy()
            name = det.session.get_inputs()[0].name
            paths: dict[str, Callable[[np.ndarray], object]] = {
                f"{spec} | session.run": (lambda d, t, n: (lambda im: d.session.run(None, {n: t})))(det, tensor, name),
                f"{spec} | detector": det}
            for k, v in interleaved(paths, imgs, warmup=10, rounds=1).items():
                times.setdefault(k, []).extend(v.tolist())
    times = {k: np.asarray(v) for k, v in times.items()}
    rows = []
    base = None
    for spec, path, trained in files:
        det = dets[spec]
        run, full = stats(times[f"{spec} | session.run"]), stats(times[f"{spec} | detector"])
        row = {"model": spec, "version": det.info.version, "input_hw": list(det.info.input_hw),
               "file_mb": round(path.stat().st_size / 1e6, 2), "session_run": run, "detector": full,
               "trained": trained}
        if a.eval and trained:
            from vision.evaluation import EvalConfig, evaluate

            rep = evaluate(path, Path(a.eval), EvalConfig(split=a.split, threads=a.threads, distractor_frames=0))
            row.update(map50=round(rep["map50"], 4), map50_95=round(rep["map50_95"], 4))
        if base is None:
            base = row
        row["session_run_vs_baseline"] = round(run["median_ms"] / base["session_run"]["median_ms"], 3)
        if "map50_95" in row and "map50_95" in base:
            row["map50_95_per_ms"] = round(row["map50_95"] / run["median_ms"], 4)
        rows.append(row)
    print(f"{len(imgs)} frames {imgs[0].shape[1]}x{imgs[0].shape[0]}; onnxruntime intra-op {a.threads}, "
          f"inter-op 1; OpenCV {cv2.getNumThreads()}; load average {os.getloadavg()}; baseline {rows[0]['model']}")
    print(f"{'model':<46} {'input':>9} {'mAP50':>6} {'50-95':>6} {'run ms':>7} {'p99':>6} {'det ms':>7} {'x base':>7}")
    for r in rows:
        print(f"{r['model'][-46:]:<46} {'x'.join(map(str, r['input_hw'])):>9} {r.get('map50', '-')!s:>6} "
              f"{r.get('map50_95', '-')!s:>6} {r['session_run']['median_ms']:>7} {r['session_run']['p99_ms']:>6} "
              f"{r['detector']['median_ms']:>7} {r['session_run_vs_baseline']:>7}")
    print(json.dumps({"threads": a.threads, "frames": len(imgs), "load_average": os.getloadavg(), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
