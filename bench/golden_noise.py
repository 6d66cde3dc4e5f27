"""How much of a per-class AP50 difference between two models is the golden set's sampling noise.

    .venv/bin/python bench/golden_noise.py CANDIDATE.onnx ACTIVE.onnx [--golden datasets/golden-v1.yaml]
        [--split test] [--resamples 2000] [--seed 0] [--json]

The promotion gate refuses a candidate whose AP50 on any class falls more than a fixed tolerance
(0.02) below the active model's on the golden set. A class there has 110–160 instances in 300
images, so the difference between two models' AP50 moves by about that much from one draw of 300
images to the next (measured: s.d. 0.006–0.022 per class between fine-tunes of det-v4). This bench
runs both models once over the golden images (the station's own onnxruntime detector, mAP settings
of `kozan model eval`), then draws the images again with replacement, the *same* draw for both
models (a paired bootstrap), and reports per class: both AP50s, their difference, and the 90 %
interval of that difference over the draws. A difference whose interval straddles 0 is one the set
cannot tell from chance; one whose interval lies wholly below 0 is a real loss on rendered data.

Accuracy, not speed. It does not change the gate: it is the measurement to set its tolerance by.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vision.evaluation import EvalConfig, average_precision, map_detector, matched_images, split_for  # noqa: E402


def per_image(model: str, golden: str, cfg: EvalConfig) -> tuple[list[str], list[list[tuple[np.ndarray, np.ndarray, int]]]]:
    """For each image and class: the detections' scores, whether each is a TP at IoU 0.5, and the ground truths."""
    det = map_detector(model, cfg)
    names = list(det.names)
    out = []
    for _, _, gt_cls, d, tp in matched_images(det, split_for(det, golden, cfg)):
        out.append([(d.scores[d.class_ids == c], tp[d.class_ids == c, :1], int((gt_cls == c).sum()))
                    for c in range(len(names))])
    return names, out


def ap50(rows: list[list[tuple[np.ndarray, np.ndarray, int]]], idx: np.ndarray, c: int) -> float:
    scores = np.concatenate([rows[i][c][0] for i in idx])
    tp = np.concatenate([rows[i][c][1] for i in idx])
    return float(average_precision(tp, scores, sum(rows[i][c][2] for i in idx))[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidate")
    ap.add_argument("active")
    ap.add_argument("--golden", default="datasets/golden-v1.yaml")
    ap.add_argument("--split", default="test")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    cfg = EvalConfig(split=a.split, threads=a.threads)
    names, cand = per_image(a.candidate, a.golden, cfg)
    names_a, act = per_image(a.active, a.golden, cfg)
    if names != names_a:
        print(f"the models' classes differ: {names} / {names_a}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(a.seed)
    n = len(cand)
    draws = [rng.integers(0, n, n) for _ in range(a.resamples)]
    everything = np.arange(n)
    result = {}
    print(f"{n} images of {a.golden} [{a.split}], {a.resamples} paired resamples (seed {a.seed})")
    print(f"{'class':12s} {'inst':>5s} {'cand':>6s} {'active':>6s} {'diff':>7s}   90 % interval of diff   P(diff<0)")
    for c, name in enumerate(names):
        diffs = np.array([ap50(cand, d, c) - ap50(act, d, c) for d in draws])
        lo, hi = np.quantile(diffs, [0.05, 0.95])
        pc, pa = ap50(cand, everything, c), ap50(act, everything, c)
        inst = sum(r[c][2] for r in cand)
        result[name] = {"instances": inst, "candidate": round(pc, 4), "active": round(pa, 4),
                        "diff": round(pc - pa, 4), "p05": round(float(lo), 4), "p95": round(float(hi), 4),
                        "sd": round(float(diffs.std()), 4), "p_below_0": round(float((diffs < 0).mean()), 3)}
        r = result[name]
        print(f"{name:12s} {inst:5d} {pc:6.3f} {pa:6.3f} {pc - pa:+7.3f}   [{lo:+.3f}, {hi:+.3f}] sd {r['sd']:.3f}"
              f"   {r['p_below_0']:.2f}")
    if a.json:
        print(json.dumps({"candidate": a.candidate, "active": a.active, "golden": a.golden, "split": a.split,
                          "resamples": a.resamples, "seed": a.seed, "per_class": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
