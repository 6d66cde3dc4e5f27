"""Training data for the board inspector: board crops as the station's camera takes them.

Why from the simulated line and not the scene renderer: the inspector must see what the station
will hand it — a crop of the full-resolution camera frame around a detector's board box, with the
camera's look, blur and lighting at every position in the view. So each chunk runs a small boards
-heavy line (its own belt, lighting and camera look, from its seed) and crops every board wholly in
view every few frames, around its true box moved by a detector's typical error (`jitter`). Half
the boards carry a battery; those without one, with their capacitors and heat sinks, are the
negatives that teach it what a coin cell is not. Every battery box in a crop is labelled (a loose
cell touching a board is labelled too: the station decides "on the board" by geometry).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from station.clock import VirtualClock
from station.config import config_from_dict
from station.simline.camera import SimCamera
from station.simline.views import rendered_frames
from station.simline.world import BeltWorld
from vision.datasets import dataset_fingerprint, write_data_yaml, yolo_lines
from vision.inspection import crop_box
from vision.render.synth import Label
from vision.taxonomy import load_taxonomy

log = logging.getLogger(__name__)

BOARD_MIX = {"board_high": 0.4, "board_low": 0.4, "li_ion_cell": 0.05, "coin_cell": 0.05,
             "alkaline": 0.05, "nimh": 0.05}


def _jittered(box: tuple[float, float, float, float], rng: np.random.Generator, jitter: float) -> np.ndarray:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return np.array([x0, y0, x1, y1]) + rng.normal(0, jitter, 4) * np.array([w, h, w, h])


def write_board_crops(out: Path, n_crops: int, seed: int, val_fraction: float = 0.15,
                      battery_share: float = 0.5, jitter: float = 0.03, every: int = 6,
                      boards_per_chunk: int = 24,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """Write about `n_crops` board crops (YOLO layout, taxonomy class ids) and a data.yaml."""
    out = Path(out)
    tax = load_taxonomy()
    batteries = {c.name for c in tax.classes if c.is_battery}
    for split in ("train", "val"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    n_val = int(round(n_crops * val_fraction))
    boxes = {"train": 0, "val": 0}
    with_cell = {"train": 0, "val": 0}
    written, chunk = 0, 0
    while written < n_crops:
        chunk_seed = seed * 1000 + chunk
        rng = np.random.default_rng(chunk_seed)
        cfg = config_from_dict({"sim": {"board_battery_share": battery_share, "distractor_share": 0.05,
                                        "class_mix": BOARD_MIX, "seed": chunk_seed}})
        clock = VirtualClock(0.0)
        world = BeltWorld(cfg, clock, n_items=int(boards_per_chunk / 0.8), seed=chunk_seed)
        cam = SimCamera(cfg, world, clock, seed=chunk_seed)
        # a chunk goes wholly to one split: its frames share a belt and a look
        split = "val" if written < n_val else "train"
        for k, frame in rendered_frames(cfg, world, cam, clock, every, start=int(rng.integers(0, every))):
            H, W = frame.image.shape[:2]
            truth = cam.last_truth
            cells = [(n, b) for n, b in truth if n in batteries]
            for name, b in truth:
                if not name.startswith("board") or b[0] <= 2 or b[2] >= W - 2:
                    continue
                x0, y0, x1, y1 = crop_box(_jittered(b, rng, jitter), W, H)
                cw, ch = x1 - x0, y1 - y0
                labels = []
                for cn, (a0, b0, a1, b1) in cells:
                    c = (max(a0, x0), max(b0, y0), min(a1, x1), min(b1, y1))
                    # a battery mostly cut off by the crop's edge is not labelled in it
                    if c[2] > c[0] and c[3] > c[1] and (c[2] - c[0]) * (c[3] - c[1]) >= 0.5 * (a1 - a0) * (b1 - b0):
                        labels.append(Label(cn, (c[0] - x0, c[1] - y0, c[2] - x0, c[3] - y0)))
                lines = yolo_lines(labels, x1 - x0, y1 - y0)
                stem = f"c{chunk_seed}_{k:05d}_{int(b[0])}"
                cv2.imwrite(str(out / "images" / split / f"{stem}.jpg"), frame.image[y0:y1, x0:x1],
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
                (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
                boxes[split] += len(lines)
                with_cell[split] += bool(lines)
                written += 1
                if progress:
                    progress(written, n_crops)
            if written >= n_crops:
                break
        chunk += 1
    write_data_yaml(out)
    manifest = {"generator": "kozan dataset board-crops", "seed": seed, "n": written, "chunks": chunk,
                "battery_share": battery_share, "jitter": jitter, "every": every, "boxes": boxes,
                "crops_with_a_battery": with_cell, "fingerprint": dataset_fingerprint(out)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
