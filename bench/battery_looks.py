"""How often a loose battery's *bin* is read right, per camera view: the detector's whole-frame
view (what decides today) against the battery inspector's close crop of the same item.

    .venv/bin/python bench/battery_looks.py [--model models/active.onnx]
        --inspector models/inspector/batt-v2.onnx [--items 120] [--seed 12] [--every 6]
        [--distractor-share 0.1]

The simulated line's camera renders loose batteries and some distractors (no boards); every
`--every`th frame, each item wholly in view is matched to the detector's box with the highest IoU
(≥ 0.3). The crop is taken around that box, as the station would, and read by the inspector.
A view counts as right when the class read lies in the item's bin (Li-ion → 1, other batteries → 2;
a distractor is right when nothing battery-like is read). Prints, per true class, views, right
reads by each way of looking, and the confusions between the Li-ion bin and the other-battery bin
(the ones the line's safety rule sends to manual). A distractor is only looked at when the far
view has a box on it, as on the line; `--distractor-share 0.5` makes those views numerous enough to
count the plastic fragments a battery inspector takes for a cell. Accuracy, not speed: the figures
go into the model card.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from station.clock import VirtualClock  # noqa: E402
from station.config import config_from_dict  # noqa: E402
from station.simline.camera import SimCamera  # noqa: E402
from station.simline.views import best_box, whole_item_views  # noqa: E402
from station.simline.world import BeltWorld  # noqa: E402
from vision.detector import Detector  # noqa: E402
from vision.inspection import BatteryInspector  # noqa: E402

MIX = {"li_ion_cell": 1.0, "alkaline": 1.0, "nimh": 1.0, "coin_cell": 0.6, "li_ion_pack": 0.4, "lead_acid": 0.3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/active.onnx")
    ap.add_argument("--inspector", required=True, help="battery inspector model (ONNX)")
    ap.add_argument("--items", type=int, default=120)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--distractor-share", type=float, default=0.1, help="share of items that are distractors")
    a = ap.parse_args()
    cfg = config_from_dict({"sim": {"distractor_share": a.distractor_share, "board_battery_share": 0.0,
                                    "class_mix": MIX}})
    bins = cfg.rules.class_to_bin
    clock = VirtualClock(0.0)
    world = BeltWorld(cfg, clock, n_items=a.items, seed=a.seed)
    cam = SimCamera(cfg, world, clock, seed=a.seed)
    det = Detector(a.model)
    insp = BatteryInspector(a.inspector)
    views: Counter[str] = Counter()
    right = {"whole frame": Counter(), "inspector": Counter()}
    crossed = {"whole frame": Counter(), "inspector": Counter()}      # Li-ion <-> other battery
    reads: dict[str, Counter[str]] = defaultdict(Counter)
    for frame, items in whole_item_views(cfg, world, cam, clock, a.every):
        d = det(frame.image)
        for name, b, _ in items:
            j = best_box(d, b)
            if j is None:
                continue
            views[name] += 1
            truth_bin = bins.get(name, 0)
            far = det.names[int(d.class_ids[j])]
            look = insp.inspect(frame.image, d.boxes[j])
            close = insp.names[look.class_id] if look.class_id is not None else "-"
            reads[name][close] += 1
            for way, read in (("whole frame", far), ("inspector", close)):
                got = bins.get(read, 0)
                right[way][name] += got == truth_bin
                crossed[way][name] += {got, truth_bin} == {1, 2}
    out = {"model": det.info.version, "inspector": insp.version, "items": a.items, "seed": a.seed,
           "distractor_share": a.distractor_share,
           "views": dict(views), "right": {w: dict(c) for w, c in right.items()},
           "li_ion_vs_other": {w: dict(c) for w, c in crossed.items()}, "inspector_reads": reads}
    print(f"{'class':<18}{'views':>6}  {'right: far':>11} {'inspector':>10}   {'Li-ion<->other: far':>20} {'inspector':>10}")
    for name in sorted(views):
        v = views[name]
        print(f"{name:<18}{v:>6}  {right['whole frame'][name] / v:>11.3f} {right['inspector'][name] / v:>10.3f}   "
              f"{crossed['whole frame'][name]:>20} {crossed['inspector'][name]:>10}")
    tot = sum(views.values())
    print(f"{'all':<18}{tot:>6}  {sum(right['whole frame'].values()) / tot:>11.3f} "
          f"{sum(right['inspector'].values()) / tot:>10.3f}   {sum(crossed['whole frame'].values()):>20} "
          f"{sum(crossed['inspector'].values()):>10}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
