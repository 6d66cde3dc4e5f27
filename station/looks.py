"""Who runs the inspectors' looks: the loop's own thread, or a worker beside it.

A look (vision.inspection) is a second model run on a crop of the full-resolution frame: at a
board (~15 ms on 2 cores, 320 px), or at a loose battery (~3 ms, 160 px). Made on the loop's
thread in real time, a frame with a board look takes ~35 ms at 30 fps: measured, 59 of ~900
frames dropped in 30 s of `kozan run` against 4 without looks. So in real time a worker thread
makes the looks while the loop goes on; an answer arrives a frame or two later, long before the
item reaches the decision line (~1 s after it is first wholly in view). In virtual time there is
no frame deadline and results must not depend on thread timing, so a look is made at once, on
the caller's thread.

Looks come in kinds ("board", "battery"), one inspector each; at most one look of each kind is in
flight, which bounds what they cost a frame.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class InlineLooks:
    """Looks made when asked, on the caller's thread (virtual time; deterministic)."""

    def __init__(self, inspectors: dict[str, Any]):
        self.inspectors = dict(inspectors)
        self._done: list[tuple[str, int, Any]] = []

    @property
    def kinds(self) -> set[str]:
        return set(self.inspectors)

    def busy(self, kind: str) -> bool:
        return False

    def submit(self, kind: str, track_id: int, image: np.ndarray, box: np.ndarray) -> None:
        self._done.append((kind, track_id, self.inspectors[kind].inspect(image, box)))

    def take(self) -> list[tuple[str, int, Any]]:
        """(kind, track id, the inspector's answer; None: the look failed) for every look finished
        since the last call."""
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        pass


class ThreadedLooks(InlineLooks):
    """Looks on one worker thread (real time). `busy(kind)` while a look of that kind is in flight."""

    def __init__(self, inspectors: dict[str, Any]):
        super().__init__(inspectors)
        self._q: queue.Queue[tuple[str, int, np.ndarray, tuple[float, float, float, float]] | None] = \
            queue.Queue(maxsize=len(self.inspectors))
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {k: 0 for k in self.inspectors}
        self._thread = threading.Thread(target=self._run, name="kozan-looks", daemon=True)
        self._thread.start()

    def busy(self, kind: str) -> bool:
        with self._lock:
            return self._pending[kind] > 0

    def submit(self, kind: str, track_id: int, image: np.ndarray, box: np.ndarray) -> None:
        # the camera may reuse its frame buffer: the worker gets its own copy of just the crop
        H, W = image.shape[:2]
        x0, y0, x1, y1 = self.inspectors[kind].window(box, W, H)
        crop = image[y0:y1, x0:x1].copy()
        with self._lock:
            self._pending[kind] += 1
        self._q.put((kind, track_id, crop, (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)))

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            kind, track_id, crop, box = job
            try:
                answer = self.inspectors[kind].inspect(crop, box)
            except Exception:          # a failed look is no look: the sorter falls back to the detector's view
                log.exception("%s inspector failed on item %d", kind, track_id)
                answer = None          # the loop raises the alarm: the operator is told
            with self._lock:
                self._pending[kind] -= 1
                self._done.append((kind, track_id, answer))

    def take(self) -> list[tuple[str, int, Any]]:
        with self._lock:
            return super().take()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=2)
