"""Labelled training scenes from the same item and belt models the simulated line uses.

`render_scene` draws one random frame: a belt, a handful of items (targets, distractors,
boards with a battery still on them), touching and overlapping as they do on a real feed,
some cut by the frame edge, under a random camera. Labels are exact boxes of the target
classes; a part hidden under other items beyond `min_visible` is not labelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from vision.render.items import DISTRACTORS, TARGET_CLASSES, draw_item, sample_item
from vision.render.scene import (
    Placement, apply_camera, composite, make_belt_texture, random_belt_style, random_camera_look,
)


@dataclass
class SynthSettings:
    """Generator settings. The held-out test set uses shifted values of these, never tuned together."""

    width: int = 1280
    height: int = 720
    px_per_mm: float = 1.8
    scale_jitter: float = 0.15          # camera height varies between stations
    items_min: int = 1
    items_max: int = 9
    distractor_p: float = 0.25
    attach_battery_p: float = 0.12
    overlap_p: float = 0.25             # chance an item is dropped onto another one
    empty_frame_p: float = 0.03
    min_visible: float = 0.35
    line_look_p: float = 0.0            # share of scenes under a station's own fixed, plain look
    class_weights: dict[str, float] = field(default_factory=lambda: {c: 1.0 for c in TARGET_CLASSES})
    subtype_weights: dict[str, float] = field(default_factory=dict)   # "alkaline/9V": 4.0 (items.sample_item)


@dataclass
class Label:
    class_name: str
    box: tuple[float, float, float, float]  # xyxy px in the rendered image


def _visible_fraction(masks: list[np.ndarray], idx: int) -> float:
    own = masks[idx]
    total = float(own.sum())
    if total <= 0:
        return 0.0
    vis = own.copy()
    for m in masks[idx + 1:]:
        vis *= (1.0 - m)
    return float(vis.sum()) / total


def render_scene(rng: np.random.Generator, cfg: SynthSettings, with_distractors: bool = False):
    """One scene and its labels; with `with_distractors`, also the boxes of the distractors in it
    (visible as the labels must be): the negatives the battery inspector's crops are centred on."""
    H, W = cfg.height, cfg.width
    s = cfg.px_per_mm * float(rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter))
    wide = not (rng.random() < cfg.line_look_p)
    style = random_belt_style(rng, wide=wide)
    belt = make_belt_texture(W, H, style, rng)
    look = random_camera_look(H, W, rng, wide=wide)
    n = 0 if rng.random() < cfg.empty_frame_p else int(rng.integers(cfg.items_min, cfg.items_max + 1))
    names = list(cfg.class_weights)
    w = np.asarray([cfg.class_weights[k] for k in names], float)
    w /= w.sum()
    placements: list[Placement] = []
    kinds: list[str] = []
    centers: list[tuple[float, float]] = []
    for _ in range(n):
        kind = str(rng.choice(DISTRACTORS)) if rng.random() < cfg.distractor_p else str(rng.choice(names, p=w))
        spec = sample_item(kind, rng, attach_battery_p=cfg.attach_battery_p, subtype_weights=cfg.subtype_weights)
        sp = draw_item(spec, s)
        h, wd = sp.alpha.shape
        if centers and rng.random() < cfg.overlap_p:
            cx, cy = centers[int(rng.integers(len(centers)))]
            cx += rng.normal(0, 40)
            cy += rng.normal(0, 40)
        else:
            cx, cy = rng.uniform(-0.1 * W, 1.1 * W), rng.uniform(0, H)
        placements.append(Placement(sp, int(cx - wd / 2), int(cy - h / 2)))
        kinds.append(kind)
        centers.append((cx, cy))
    img = composite(belt, placements, look)
    img = apply_camera(img, look, rng)

    # full-frame masks for occlusion; only needed for the labelled ones
    full = []
    for p in placements:
        m = np.zeros((H, W), np.float32)
        h, wd = p.sprite.alpha.shape
        x0, y0 = max(p.x, 0), max(p.y, 0)
        x1, y1 = min(p.x + wd, W), min(p.y + h, H)
        if x1 > x0 and y1 > y0:
            m[y0:y1, x0:x1] = p.sprite.alpha[y0 - p.y:y1 - p.y, x0 - p.x:x1 - p.x]
        full.append(m)
    labels: list[Label] = []
    distractor_boxes: list[tuple[float, float, float, float]] = []
    for i, (p, kind) in enumerate(zip(placements, kinds)):
        boxes = []
        if kind in TARGET_CLASSES:
            boxes.append((kind, p.sprite.box))
        boxes.extend(p.sprite.parts)
        negative = with_distractors and kind in DISTRACTORS
        if not boxes and not negative:
            continue
        # fraction of the whole object inside the frame
        inside = float(full[i].sum()) / max(float(p.sprite.alpha.sum()), 1e-6)
        vis = _visible_fraction(full, i) * inside
        if vis < cfg.min_visible:
            continue
        if negative:
            bx0, by0, bx1, by1 = p.sprite.box
            distractor_boxes.append((float(np.clip(bx0 + p.x, 0, W)), float(np.clip(by0 + p.y, 0, H)),
                                     float(np.clip(bx1 + p.x, 0, W)), float(np.clip(by1 + p.y, 0, H))))
            continue
        for cls, (bx0, by0, bx1, by1) in boxes:
            x0, y0 = np.clip(bx0 + p.x, 0, W), np.clip(by0 + p.y, 0, H)
            x1, y1 = np.clip(bx1 + p.x, 0, W), np.clip(by1 + p.y, 0, H)
            if x1 - x0 < 3 or y1 - y0 < 3:
                continue
            # a part cut by the frame edge to a sliver is not learnable
            area = (bx1 - bx0) * (by1 - by0)
            if (x1 - x0) * (y1 - y0) < 0.3 * area:
                continue
            labels.append(Label(cls, (float(x0), float(y0), float(x1), float(y1))))
    if with_distractors:
        return img, labels, distractor_boxes
    return img, labels


def shifted_settings(base: SynthSettings) -> SynthSettings:
    """Held-out generator settings: denser, more overlap, more boards with batteries, other scale."""
    return SynthSettings(
        width=base.width, height=base.height, px_per_mm=base.px_per_mm * 0.95, scale_jitter=0.2,
        items_min=2, items_max=11, distractor_p=0.35, attach_battery_p=0.2, overlap_p=0.35,
        empty_frame_p=0.02, min_visible=base.min_visible, class_weights=dict(base.class_weights),
        subtype_weights=dict(base.subtype_weights),
    )


def resize_for_storage(img: np.ndarray, labels: list[Label], width: int) -> tuple[np.ndarray, list[Label]]:
    """Downscale with INTER_AREA, the same filter the detector's letterbox uses."""
    H, W = img.shape[:2]
    if width >= W:
        return img, labels
    r = width / W
    out = cv2.resize(img, (width, int(round(H * r))), interpolation=cv2.INTER_AREA)
    return out, [Label(l.class_name, tuple(v * r for v in l.box)) for l in labels]  # type: ignore[misc]
