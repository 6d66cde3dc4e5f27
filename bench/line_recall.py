"""Which items the detector's far view never finds on the simulated line, per class and subtype.

    .venv/bin/python bench/line_recall.py [--model models/active.onnx] [--items 2000] [--seed 1]
        [--every 3] [--json]

The line's own item stream and camera (the same items and look as `kozan sim --items N --seed S`)
are rendered; every `--every`th frame, each item wholly in view is matched to the detector's boxes.
A view *finds* the item when a box of any class overlaps it with IoU ≥ 0.3, and reads it *right*
when that box's class lies in the item's bin. An item never found in any of its whole views goes
to the end of the belt unseen: the station's rules and looks cannot recover it, only the detector
can. The table is per class and subtype (9 V blocks are alkaline, but not cylinders), because a
look the model misses is a small share of its class and hides in per-class figures. Accuracy,
not speed: the figures go into the model card. A board carrying a cell is its own row (+battery):
its right bin is the manual one, which no single box of the far view reads.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from station.clock import VirtualClock  # noqa: E402
from station.config import load_config  # noqa: E402
from station.simline.camera import SimCamera  # noqa: E402
from station.simline.views import best_box, whole_item_views  # noqa: E402
from station.simline.world import BeltWorld  # noqa: E402
from vision.detector import Detector  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/active.onnx")
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--every", type=int, default=3, help="look at every Nth frame (an item is whole in ~30)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads")
    ap.add_argument("--json", action="store_true", help="also print the per-item figures as one JSON line")
    a = ap.parse_args()
    cfg = load_config(None)
    bins = cfg.rules.class_to_bin
    clock = VirtualClock(0.0)
    world = BeltWorld(cfg, clock, n_items=a.items, seed=a.seed)
    cam = SimCamera(cfg, world, clock, seed=a.seed)
    det = Detector(a.model, threads=a.threads)
    views: Counter[int] = Counter()
    found: Counter[int] = Counter()
    right: Counter[int] = Counter()
    for frame, items in whole_item_views(cfg, world, cam, clock, a.every):
        d = det(frame.image)
        for _, b, iid in items:
            views[iid] += 1
            j = best_box(d, b)
            if j is None:
                continue
            found[iid] += 1
            right[iid] += bins.get(det.names[int(d.class_ids[j])], 0) == world.items[iid - 1].expected_bin
    rows: dict[str, Counter[str]] = defaultdict(Counter)
    unseen: dict[str, list[int]] = defaultdict(list)
    for it in world.items:
        if not it.spec.is_target or views[it.id] == 0:
            continue
        key = f"{it.spec.kind}/{it.spec.subtype}" + ("+battery" if it.spec.attached is not None else "")
        r = rows[key]
        r["items"] += 1
        r["views"] += views[it.id]
        r["found"] += found[it.id]
        r["right"] += right[it.id]
        if found[it.id] == 0:
            r["never_found"] += 1
            unseen[key].append(it.id)
    print(f"model {det.info.version}, {a.items} items, seed {a.seed}, 1 frame in {a.every}, "
          f"{a.threads} onnxruntime threads")
    print(f"{'class/subtype':<32}{'items':>6}{'never found':>12}{'views':>7}{'found':>8}{'right bin':>10}")
    tot: Counter[str] = Counter()
    for key in sorted(rows):
        r = rows[key]
        tot.update(r)
        print(f"{key:<32}{r['items']:>6}{r['never_found']:>12}{r['views']:>7}{r['found'] / r['views']:>8.3f}"
              f"{r['right'] / r['views']:>10.3f}")
    print(f"{'all':<32}{tot['items']:>6}{tot['never_found']:>12}{tot['views']:>7}"
          f"{tot['found'] / max(tot['views'], 1):>8.3f}{tot['right'] / max(tot['views'], 1):>10.3f}")
    if a.json:
        print(json.dumps({"model": det.info.version, "items": a.items, "seed": a.seed, "every": a.every,
                          "rows": rows, "never_found_ids": unseen}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
