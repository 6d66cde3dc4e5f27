"""Who runs the board inspector's looks: the loop's own thread, or a worker beside it.

A look (vision.inspection) costs about as much as a detector frame (~15 ms on 2 cores). Made on
the loop's thread in real time, a frame with a look takes ~35 ms at 30 fps: measured, 59 of
~900 frames dropped in 30 s of `kozan run` against 4 without looks. So in real time a worker
thread makes the look while the loop goes on; its answer arrives a frame or two later, long
before the board reaches the decision line (~1 s after it is first wholly in view). In virtual
time there is no frame deadline and results must not depend on thread timing, so the look is
made at once, on the caller's thread.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import numpy as np

from vision.inspection import crop_box

log = logging.getLogger(__name__)


class InlineLooks:
    """Looks made when asked, on the caller's thread (virtual time; deterministic)."""

    def __init__(self, inspector: Any):
        self.inspector = inspector
        self._done: list[tuple[int, bool | None]] = []

    def busy(self) -> bool:
        return False

    def submit(self, track_id: int, image: np.ndarray, box: np.ndarray) -> None:
        self._done.append((track_id, bool(self.inspector.inspect(image, box).found)))

    def take(self) -> list[tuple[int, bool | None]]:
        """(track id, battery found; None: the look failed) for every look finished since the last call."""
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        pass


class ThreadedLooks(InlineLooks):
    """One look at a time on a worker thread (real time). `busy()` while one is in flight."""

    def __init__(self, inspector: Any):
        super().__init__(inspector)
        self._q: queue.Queue[tuple[int, np.ndarray, tuple[float, float, float, float]] | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="kozan-looks", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        with self._lock:
            return self._pending > 0

    def submit(self, track_id: int, image: np.ndarray, box: np.ndarray) -> None:
        # the camera may reuse its frame buffer: the worker gets its own copy of just the crop
        H, W = image.shape[:2]
        x0, y0, x1, y1 = crop_box(box, W, H)
        crop = image[y0:y1, x0:x1].copy()
        with self._lock:
            self._pending += 1
        self._q.put((track_id, crop, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)))

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            track_id, crop, box = job
            try:
                found = bool(self.inspector.inspect(crop, box).found)
            except Exception:          # a failed look is no look: the sorter falls back to the detector's view
                log.exception("board inspector failed on item %d", track_id)
                found = None           # the loop raises the alarm: the operator is told
            with self._lock:
                self._pending -= 1
                self._done.append((track_id, found))

    def take(self) -> list[tuple[int, bool | None]]:
        with self._lock:
            return super().take()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=2)
