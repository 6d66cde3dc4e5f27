"""A detector that reads the simulated line's ground truth instead of the pixels.

It isolates everything after detection — tracking, sorting, timing, the serial link and the
judge — from the model's quality: with it, a sorting error is a bug in the station, never a
missed detection. Used by tests and by `kozan sim --oracle`; never by a real line.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.simline.camera import SimCamera
from vision.detections import Detections
from vision.taxonomy import load_taxonomy


@dataclass(frozen=True)
class _Info:
    version: str = "ground-truth-oracle"


class OracleDetector:
    def __init__(self, camera: SimCamera, score: float = 0.9):
        self.camera = camera
        self.names = tuple(load_taxonomy().names)
        self.info = _Info()
        self.score = score

    def __call__(self, image: np.ndarray) -> Detections:
        truth = self.camera.last_truth
        if not truth:
            return Detections.empty()
        ids = [self.names.index(n) for n, _ in truth]
        boxes = np.asarray([b for _, b in truth], np.float32)
        return Detections(boxes, np.full(len(truth), self.score, np.float32), np.asarray(ids, np.int32))
