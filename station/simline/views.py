"""The simulated line seen frame by frame, for benches that score what a model makes of each item."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from station.clock import VirtualClock
from station.config import StationConfig
from station.simline.camera import SimCamera
from station.simline.world import BeltWorld
from vision.detections import Detections, box_iou
from vision.frame import Frame

Box = tuple[float, float, float, float]


def rendered_frames(cfg: StationConfig, world: BeltWorld, cam: SimCamera, clock: VirtualClock, every: int,
                    start: int = 0) -> Iterator[tuple[int, Frame]]:
    """Every `every`th camera frame (and its number, counted from `start`) until the last item has passed.

    The belt between rendered frames still runs and settles, so the line's timing is the real one.
    """
    k = start
    while not world.all_items_past():
        t = k / cfg.camera.fps
        clock.advance_to(t)
        k += 1
        if k % every:
            world.settle()
            continue
        frame = cam.render_at(t)
        world.settle()
        yield k, frame


def whole_item_views(cfg: StationConfig, world: BeltWorld, cam: SimCamera, clock: VirtualClock,
                     every: int) -> Iterator[tuple[Frame, list[tuple[str, Box, int]]]]:
    """Every `every`th frame with the items wholly in it (kind, box, item id), distractors too.

    An item cut by the image edge is left out: a bench scores views the station could have
    decided on, and a cut item's box says little about what the model can see of it.
    """
    for _, frame in rendered_frames(cfg, world, cam, clock, every):
        W = frame.image.shape[1]
        items = [it for it in cam.last_items if it[1][0] > 5 and it[1][2] < W - 5]
        if items:
            yield frame, items


def best_box(det: Detections, box: Box, min_iou: float = 0.3) -> int | None:
    """The detection that is this item: the one overlapping `box` most, if by at least `min_iou`."""
    if len(det) == 0:
        return None
    iou = box_iou(det.boxes, np.array([box], np.float64))[:, 0]
    j = int(iou.argmax())
    return j if iou[j] >= min_iou else None
