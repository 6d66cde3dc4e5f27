"""Training data for the battery inspector: close crops of loose batteries from the scene renderer.

Why a closer look at batteries: the detector sees the 711 mm view at ~0.6 px/mm, where an AA cell
is 9 px across and an 18650 differs from it by 8 px of length; its votes then split between
Li-ion and "other batteries" and the item goes to manual (models/MODEL_CARD.md). In the
full-resolution frame (1.8 px/mm) the same cell is 26 × 91 px, with its wrap, print and the
white insulator ring of a Li-ion cell visible. So the station crops each battery track from the
full frame and asks a model trained on exactly such crops (vision.inspection.BatteryInspector).

Why from the renderer and not the simulated line: the line's frames have one look per line
seed, and a model trained on a few dozen looks misreads the next one (tried: cells-v1 in
models/MODEL_CARD.md). The renderer randomises belt, lighting and camera per scene. Scenes are
rendered at the station's resolution and cropped with `battery_crop_box`, the same window the
station uses, around the true box moved by a far-view detector's typical error (`jitter`).
Everything in the crop that is a target class is labelled, so a neighbour cut by the window is
learnt as what it is; crops around distractors (cables, fragments, screws) teach "nothing here".
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from vision.datasets import dataset_fingerprint, tally_jobs, write_data_yaml, yolo_lines
from vision.inspection import battery_crop_box
from vision.render.items import DISTRACTORS
from vision.render.synth import Label, SynthSettings, render_scene, shifted_settings
from vision.taxonomy import load_taxonomy

# cells are what the far view confuses; packs and lead-acid blocks are in the mix so that the
# inspector knows them too when a track of one is handed to it
CELL_WEIGHTS = {"board_high": 0.4, "board_low": 0.4, "li_ion_cell": 2.0, "li_ion_pack": 0.7, "alkaline": 2.0,
                "nimh": 2.0, "coin_cell": 1.2, "lead_acid": 0.6}


def _jittered(box: tuple[float, float, float, float], rng: np.random.Generator, jitter: float) -> np.ndarray:
    """A far-view detector's box: ~3 px at its 0.6 px/mm is ~9 px here, more on longer items."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return np.array([x0, y0, x1, y1]) + rng.normal(0, 1, 4) * (jitter * np.array([w, h, w, h]) + 4.0)


def _crops_of_scene(args: tuple[Path, str, int, int, dict, float, float]) -> tuple[int, dict[str, int]]:
    out, split, seed, index, settings, jitter, negative_p = args
    cv2.setNumThreads(1)
    rng = np.random.default_rng([seed, index])
    cfg = SynthSettings(**settings)
    img, labels, extras = render_scene(rng, cfg, with_distractors=True)
    H, W = img.shape[:2]
    tax = load_taxonomy()
    batteries = {c.name for c in tax.classes if c.is_battery}
    centres: list[tuple[str, tuple[float, float, float, float]]] = [
        (l.class_name, l.box) for l in labels if l.class_name in batteries]
    centres += [("-", b) for b in extras if rng.random() < negative_p]
    counts: dict[str, int] = {}
    for k, (name, box) in enumerate(centres):
        x0, y0, x1, y1 = battery_crop_box(_jittered(box, rng, jitter), W, H)
        if x1 - x0 < 12 or y1 - y0 < 12:
            continue
        inside = []
        for l in labels:
            a0, b0, a1, b1 = l.box
            c = (max(a0, x0), max(b0, y0), min(a1, x1), min(b1, y1))
            # a neighbour mostly cut off by the window is not labelled in it
            if c[2] > c[0] and c[3] > c[1] and (c[2] - c[0]) * (c[3] - c[1]) >= 0.5 * (a1 - a0) * (b1 - b0):
                inside.append(Label(l.class_name, (c[0] - x0, c[1] - y0, c[2] - x0, c[3] - y0)))
        stem = f"{seed}_{index:06d}_{k}"
        cv2.imwrite(str(out / "images" / split / f"{stem}.jpg"), img[y0:y1, x0:x1], [cv2.IMWRITE_JPEG_QUALITY, 93])
        lines = yolo_lines(inside, x1 - x0, y1 - y0)
        (out / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        counts[name] = counts.get(name, 0) + 1
    return index, counts


def write_battery_crops(out: Path, scenes: int, seed: int, val_fraction: float = 0.1, test_scenes: int = 0,
                        jitter: float = 0.08, negative_p: float = 0.5, line_look: float = 0.5,
                        distractor_p: float = 0.3, workers: int | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """Crops of every battery (and some distractors) in `scenes` rendered scenes; a YOLO set + data.yaml.

    `test_scenes` adds a held-out split from another seed under the renderer's shifted settings,
    as the detector's own test split is made. `distractor_p` and `negative_p` set how many crops
    teach "no battery here": on the line, a plastic fragment the far view takes for a cell is
    sorted into a battery bin when this inspector agrees (models/MODEL_CARD.md, batt-v2).
    """
    out = Path(out)
    base = replace(SynthSettings(), class_weights=dict(CELL_WEIGHTS), distractor_p=distractor_p,
                   attach_battery_p=0.0, line_look_p=line_look)
    n_val = int(round(scenes * val_fraction))
    test_seed = seed + 1_000_003
    jobs = [(out, "val" if i < n_val else "train", seed, i, asdict(base), jitter, negative_p) for i in range(scenes)]
    jobs += [(out, "test", test_seed, i, asdict(shifted_settings(base)), jitter, negative_p)
             for i in range(test_scenes)]
    for split in ("train", "val", "test"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    totals = tally_jobs(_crops_of_scene, jobs, workers, progress)     # spawned workers, never forked
    write_data_yaml(out, with_test=bool(test_scenes))
    manifest = {"generator": "kozan dataset battery-crops", "seed": seed, "scenes": scenes,
                "test_seed": test_seed if test_scenes else None, "test_scenes": test_scenes,
                "jitter": jitter, "negative_p": negative_p, "distractor_p": distractor_p,
                "settings": asdict(base),
                "crops_centred_on": totals, "fingerprint": dataset_fingerprint(out)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
