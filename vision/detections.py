"""The one value type that flows from the detector through tracking: arrays, not objects.

Per-object Python objects in the hot path cost more than the maths on them; a dataclass of
numpy arrays keeps every stage vectorised and validates its shapes once, where it is made.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def containment(small: np.ndarray, big: np.ndarray) -> np.ndarray:
    """Fraction of each `small` box's area inside each `big` box (xyxy, S×4 and B×4): (S, B).

    "Is this battery on that board" everywhere: tracking, the board inspector, the benches."""
    small = np.asarray(small).reshape(-1, 4)
    big = np.asarray(big).reshape(-1, 4)
    x0 = np.maximum(small[:, None, 0], big[None, :, 0])
    y0 = np.maximum(small[:, None, 1], big[None, :, 1])
    x1 = np.minimum(small[:, None, 2], big[None, :, 2])
    y1 = np.minimum(small[:, None, 3], big[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (small[:, 2] - small[:, 0]) * (small[:, 3] - small[:, 1])
    return inter / np.maximum(area[:, None], 1e-9)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-12)


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray      # (N, 4) float32 xyxy in source-image pixels
    scores: np.ndarray     # (N,) float32
    class_ids: np.ndarray  # (N,) int32

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4):
            raise ValueError(f"boxes must be (N, 4), got {self.boxes.shape}")
        if self.scores.shape != (n,) or self.class_ids.shape != (n,):
            raise ValueError(f"scores {self.scores.shape} and class_ids {self.class_ids.shape} must be ({n},)")

    def __len__(self) -> int:
        return len(self.boxes)

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32))

    def take(self, idx: np.ndarray) -> "Detections":
        return Detections(self.boxes[idx], self.scores[idx], self.class_ids[idx])

    @property
    def centers(self) -> np.ndarray:
        return np.stack([(self.boxes[:, 0] + self.boxes[:, 2]) / 2, (self.boxes[:, 1] + self.boxes[:, 3]) / 2], 1)
