"""How often the detector sees a battery still fixed to a board, per camera view: the whole frame
(what the station does) against a zoomed crop of each board (the baseline is the whole frame).

    .venv/bin/python bench/attached_cells.py [--model models/active.onnx] [--boards 40]
        [--share 0.5] [--zooms 2,3] [--inspector models/inspector/insp-v2.onnx]

The simulated line's camera renders only boards (a `--share` of them carrying a cell); every 6th
frame, each board wholly in view is checked: with a cell, is a battery box found on that cell
(both boxes at least 30 % inside each other)? Without one, is any battery box reported inside
the board (a false alarm: capacitors read as coin cells)? Prints views, hits and rates per way of
looking. `--inspector` adds the board inspector's look (vision.inspection: a crop of the board at
full camera resolution, through a model trained on such crops). Accuracy, not speed: the figures
go into the model card.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from station.clock import VirtualClock  # noqa: E402
from station.config import config_from_dict  # noqa: E402
from station.simline.camera import SimCamera  # noqa: E402
from station.simline.world import BeltWorld  # noqa: E402
from vision.detections import containment  # noqa: E402
from vision.detector import Detector  # noqa: E402

BOARDS = {"board_high", "board_low"}


def inside(a, b) -> float:
    """Share of box a's area that lies inside box b."""
    return float(containment(a, b)[0, 0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/active.onnx")
    ap.add_argument("--boards", type=int, default=40)
    ap.add_argument("--share", type=float, default=0.5, help="share of boards carrying a cell")
    ap.add_argument("--zooms", default="2,3")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--inspector", default=None, help="board inspector model (ONNX)")
    a = ap.parse_args()
    zooms = [float(z) for z in a.zooms.split(",") if z]
    cfg = config_from_dict({"sim": {"board_battery_share": a.share, "distractor_share": 0.0,
                                    "class_mix": {"board_high": 1.0, "board_low": 1.0}}})
    clock = VirtualClock(0.0)
    world = BeltWorld(cfg, clock, n_items=a.boards, seed=a.seed)
    cam = SimCamera(cfg, world, clock, seed=3)
    det = Detector(a.model)
    names = list(det.names)
    cells = {n for n in names if n not in BOARDS}
    ways = ["whole frame"] + [f"zoom {z:g}x" for z in zooms] + (["inspector"] if a.inspector else [])
    inspector = None
    if a.inspector:
        from vision.inspection import BoardInspector
        inspector = BoardInspector(a.inspector, cells)
    seen = {w: [0, 0] for w in ways}       # boards with a cell: views, views where the cell was found
    false = {w: [0, 0] for w in ways}      # boards without: views, views with a battery box on the board
    k = 0
    while not world.all_items_past():
        t = k / cfg.camera.fps
        clock.advance_to(t)
        k += 1
        if k % 6:
            world.settle()
            continue
        frame = cam.render_at(t)
        world.settle()
        truth = cam.last_truth
        W, H = frame.image.shape[1], frame.image.shape[0]
        boards = [b for n, b in truth if n in BOARDS and b[0] > 5 and b[2] < W - 5]
        batts = [b for n, b in truth if n in cells]
        if not boards:
            continue
        whole = det(frame.image)
        for bb in boards:
            cell = next((c for c in batts if inside(c, bb) > 0.6), None)
            cx, cy = (bb[0] + bb[2]) / 2, (bb[1] + bb[3]) / 2
            for w in ways:
                if w == "inspector":
                    look = inspector.inspect(frame.image, bb)
                    if cell is not None:
                        seen[w][0] += 1
                        seen[w][1] += look.found
                    else:
                        false[w][0] += 1
                        false[w][1] += look.found
                    continue
                if w == "whole frame":
                    found = list(zip(whole.boxes.tolist(), whole.class_ids.tolist()))
                else:
                    z = float(w.split()[1][:-1])
                    cw, ch = max(W / z, (bb[2] - bb[0]) * 1.15), max(H / z, (bb[3] - bb[1]) * 1.15)
                    x0 = int(np.clip(cx - cw / 2, 0, W - cw))
                    y0 = int(np.clip(cy - ch / 2, 0, H - ch))
                    d = det(np.ascontiguousarray(frame.image[y0:y0 + int(ch), x0:x0 + int(cw)]))
                    found = [([b[0] + x0, b[1] + y0, b[2] + x0, b[3] + y0], c)
                             for b, c in zip(d.boxes.tolist(), d.class_ids.tolist())]
                on_board = [b for b, c in found if names[c] in cells and inside(b, bb) > 0.6]
                if cell is not None:
                    seen[w][0] += 1
                    seen[w][1] += any(inside(b, cell) > 0.3 and inside(cell, b) > 0.3 for b in on_board)
                else:
                    false[w][0] += 1
                    false[w][1] += bool(on_board)
    out = {"model": str(det.path), "version": det.info.version, "boards": a.boards, "share": a.share,
           "cell_found": {w: {"views": v[0], "found": v[1], "rate": round(v[1] / max(1, v[0]), 3)}
                          for w, v in seen.items()},
           "false_cell": {w: {"views": v[0], "with_a_battery_box": v[1], "rate": round(v[1] / max(1, v[0]), 3)}
                          for w, v in false.items()}}
    for w in ways:
        print(f"{w:<12} cell on a board found in {seen[w][1]}/{seen[w][0]} views "
              f"({out['cell_found'][w]['rate']:.3f}); a battery box on a board without one in "
              f"{false[w][1]}/{false[w][0]} ({out['false_cell'][w]['rate']:.3f})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
