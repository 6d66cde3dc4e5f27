"""A second, closer look at each board: is a battery still fixed to it?

Why a second look: the station's detector sees the whole 711 mm camera view squeezed into its
416-pixel input, about 0.6 px/mm. A 10–20 mm coin cell soldered to a dense board is 6–12 px
there; the detector misses most of them and reads big electrolytic capacitors as coin cells
(models/MODEL_CARD.md, "Attached cells"). A board with a cell on it must go to the manual path
(it burns in a shredder), so the station crops each board from the full-resolution frame
(1.8 px/mm, three times closer) and asks a model trained on exactly such crops.

The crop is the one thing training and the line must do identically, so it lives here and both
`station.simline.board_crops` (the training data) and the station use `crop_box`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision.detections import box_iou, containment
from vision.detector import Detector, ModelError

CROP_MARGIN = 0.06      # of the board's size, each side: a detector box may cut the board's edge
MIN_MARGIN_PX = 6


def crop_box(box: tuple[float, float, float, float] | np.ndarray, width: int, height: int,
             margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """The pixel window (x0, y0, x1, y1) the inspector sees for a board box in a width×height frame."""
    x0, y0, x1, y1 = (float(v) for v in box)
    mx = max(MIN_MARGIN_PX, margin * (x1 - x0))
    my = max(MIN_MARGIN_PX, margin * (y1 - y0))
    return (int(max(0, np.floor(x0 - mx))), int(max(0, np.floor(y0 - my))),
            int(min(width, np.ceil(x1 + mx))), int(min(height, np.ceil(y1 + my))))


BATTERY_WINDOW_PX = 160   # 89 mm at 1.8 px/mm: the longest cell (21700, 70 mm) with room for a far-view box's error
BATTERY_MIN_MARGIN_PX = 12


def battery_crop_box(box: tuple[float, float, float, float] | np.ndarray, width: int,
                     height: int) -> tuple[int, int, int, int]:
    """The window the battery inspector sees: a fixed 160 × 160 px square around the item, larger
    only for an item that does not fit (a pack, a lead-acid block), moved inside the frame.

    Fixed, because size is what tells the kinds apart: an 18650 is 65 mm, an AA 50.5 mm. A window
    proportional to the item would be letterboxed to the same size either way and erase the
    difference; at a fixed 160 px the model input is the frame's own pixels, 1:1.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(BATTERY_WINDOW_PX, x1 - x0 + 2 * BATTERY_MIN_MARGIN_PX, y1 - y0 + 2 * BATTERY_MIN_MARGIN_PX)
    sw, sh = min(int(np.ceil(side)), width), min(int(np.ceil(side)), height)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    wx0 = int(np.clip(round(cx - sw / 2), 0, width - sw))
    wy0 = int(np.clip(round(cy - sh / 2), 0, height - sh))
    return wx0, wy0, wx0 + sw, wy0 + sh


@dataclass(frozen=True)
class Inspection:
    found: bool
    class_id: int | None     # the battery class seen on the board (in the inspector's names)
    score: float


class BoardInspector:
    """Runs the inspector model on board crops. Not thread-safe: one thread owns it (station.looks)."""

    def __init__(self, model_path: str | Path, battery_names: set[str], conf: float = 0.5,
                 min_inside: float = 0.6, threads: int = 2):
        try:
            self.detector = Detector(model_path, conf_threshold=conf, threads=threads)
        except ModelError as e:
            raise ModelError(f"board inspector (inspector.model in the configuration; null turns it off): {e}") from None
        self.version = self.detector.info.version
        self.min_inside = min_inside
        self._battery_ids = np.array([i for i, n in enumerate(self.detector.names) if n in battery_names], np.int64)
        if self._battery_ids.size == 0:
            raise ValueError(f"inspector model {self.detector.path} detects {list(self.detector.names)}: "
                             f"none of them is a battery class ({sorted(battery_names)})")

    @property
    def names(self) -> tuple[str, ...]:
        return self.detector.names

    @staticmethod
    def window(box: tuple[float, float, float, float] | np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
        return crop_box(box, width, height)

    def inspect(self, image: np.ndarray, board_box: tuple[float, float, float, float] | np.ndarray) -> Inspection:
        """Look at one board in a full-resolution frame; `board_box` is in that frame's pixels."""
        H, W = image.shape[:2]
        x0, y0, x1, y1 = crop_box(board_box, W, H)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return Inspection(False, None, 0.0)
        det = self.detector(image[y0:y1, x0:x1])
        if len(det) == 0:
            return Inspection(False, None, 0.0)
        bx = (float(board_box[0]) - x0, float(board_box[1]) - y0, float(board_box[2]) - x0, float(board_box[3]) - y0)
        ok = np.isin(det.class_ids, self._battery_ids) & (containment(det.boxes, bx)[:, 0] >= self.min_inside)
        if not ok.any():
            return Inspection(False, None, 0.0)
        k = int(np.argmax(np.where(ok, det.scores, -1.0)))
        return Inspection(True, int(det.class_ids[k]), float(det.scores[k]))


@dataclass(frozen=True)
class BatteryLook:
    class_id: int | None     # what the item is, close up (in the inspector's names); None: no battery there
    score: float


class BatteryInspector:
    """Reads a loose battery's kind from a full-resolution crop (vision.battery_crops: why).

    The crop may hold a neighbour; the answer is the detection that is this item: the one that
    best overlaps the far view's box, weighted by its score. No detection that overlaps it means
    "no battery here" (a cable or a fragment the far view took for a cell).
    """

    def __init__(self, model_path: str | Path, conf: float = 0.25, min_iou: float = 0.3, threads: int = 2):
        try:
            self.detector = Detector(model_path, conf_threshold=conf, threads=threads)
        except ModelError as e:
            raise ModelError(f"battery inspector (inspector.battery_model in the configuration; null turns it "
                             f"off): {e}") from None
        self.version = self.detector.info.version
        self.min_iou = min_iou

    @property
    def names(self) -> tuple[str, ...]:
        return self.detector.names

    @staticmethod
    def window(box: tuple[float, float, float, float] | np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
        return battery_crop_box(box, width, height)

    def inspect(self, image: np.ndarray, box: tuple[float, float, float, float] | np.ndarray) -> BatteryLook:
        """Look at one item in a full-resolution frame; `box` is the far view's box in its pixels."""
        H, W = image.shape[:2]
        x0, y0, x1, y1 = battery_crop_box(box, W, H)
        if x1 - x0 < 12 or y1 - y0 < 12:
            return BatteryLook(None, 0.0)
        det = self.detector(image[y0:y1, x0:x1])
        if len(det) == 0:
            return BatteryLook(None, 0.0)
        b = np.array([[float(box[0]) - x0, float(box[1]) - y0, float(box[2]) - x0, float(box[3]) - y0]])
        iou = box_iou(det.boxes, b)[:, 0]
        ok = iou >= self.min_iou
        if not ok.any():
            return BatteryLook(None, 0.0)
        k = int(np.argmax(np.where(ok, iou * det.scores, -1.0)))
        return BatteryLook(int(det.class_ids[k]), float(det.scores[k]))
