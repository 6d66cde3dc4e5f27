"""A camera frame as the loop sees it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frame:
    seq: int                   # per-source sequence number; gaps are dropped frames
    t_ns: int                  # capture time on the host's clock (monotonic ns; virtual in fast sims)
    image: np.ndarray          # HxWx3 BGR uint8
    belt_count: int | None     # encoder count at capture when the camera is encoder-triggered
