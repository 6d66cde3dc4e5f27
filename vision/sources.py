"""Camera sources behind one small interface: the loop never asks which one it has.

`read()` blocks until the next frame and raises `CameraLost` when the source is gone (unplugged,
stream ended, folder exhausted); the station turns that into a fault and an alarm rather than a
crash. Sources are chosen by a string, as pyserial chooses transports by URL:
`opencv:0`, `opencv:rtsp://...`, `opencv:<gstreamer pipeline>`, `file:replay.mp4`, `folder:imgs/`.
The simulated line's camera lives with the simulated line (`station.simline.camera`).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import cv2

from vision.frame import Frame

log = logging.getLogger(__name__)


class CameraLost(RuntimeError):
    """The camera stopped delivering frames."""


class Camera(Protocol):
    def read(self) -> Frame: ...
    def close(self) -> None: ...


class OpenCVCamera:
    """USB cameras, GStreamer pipelines (GigE/industrial cameras), RTSP streams and video files."""

    def __init__(self, spec: str, width: int, height: int, fps: float, loop_file: bool = False):
        self.spec = spec
        self._seq = 0
        self._loop = loop_file
        self._fps = fps
        target: int | str = int(spec) if spec.isdigit() else spec
        api = cv2.CAP_GSTREAMER if "!" in spec else cv2.CAP_ANY
        self.cap = cv2.VideoCapture(target, api)
        if not self.cap.isOpened():
            raise CameraLost(f"camera {spec!r} could not be opened: check the cable/URL, that no other program "
                             "holds it, and camera.source in the configuration")
        if isinstance(target, int):
            self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            self.cap.set(cv2.CAP_PROP_FPS, fps)
        self._is_file = isinstance(target, str) and Path(target).exists()
        self._next_t = time.monotonic()

    def read(self) -> Frame:
        if self._is_file:  # replay at the recorded rate, not as fast as the disk allows
            now = time.monotonic()
            if self._next_t > now:
                time.sleep(self._next_t - now)
            self._next_t = max(self._next_t, now) + 1.0 / self._fps
        ok, img = self.cap.read()
        if not ok and self._is_file and self._loop:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, img = self.cap.read()
        if not ok or img is None:
            raise CameraLost(f"camera {self.spec!r} delivered no frame (disconnected or stream ended)")
        self._seq += 1
        return Frame(self._seq, time.monotonic_ns(), img, None)

    def close(self) -> None:
        self.cap.release()


class FolderCamera:
    """Images from a folder in name order, at a fixed rate: replaying collected data."""

    EXTS = {".jpg", ".jpeg", ".png", ".bmp"}

    def __init__(self, folder: str | Path, fps: float, loop: bool = False):
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in self.EXTS)
        if not self.files:
            raise CameraLost(f"folder {folder} holds no images ({', '.join(sorted(self.EXTS))})")
        self.fps, self.loop, self._i, self._seq = fps, loop, 0, 0
        self._next_t = time.monotonic()

    def read(self) -> Frame:
        if self._i >= len(self.files):
            if not self.loop:
                raise CameraLost("folder source exhausted")
            self._i = 0
        now = time.monotonic()
        if self._next_t > now:
            time.sleep(self._next_t - now)
        self._next_t = max(self._next_t, now) + 1.0 / self.fps
        p = self.files[self._i]
        self._i += 1
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is None:
            raise CameraLost(f"{p}: unreadable image")
        self._seq += 1
        return Frame(self._seq, time.monotonic_ns(), img, None)

    def close(self) -> None:
        pass


def open_camera(source: str, width: int, height: int, fps: float) -> Camera:
    """A real camera from its configuration string (`sim` is built by the simulated line)."""
    kind, _, rest = source.partition(":")
    if kind == "opencv" and rest:
        return OpenCVCamera(rest, width, height, fps)
    if kind == "file" and rest:
        if not Path(rest).exists():
            raise CameraLost(f"video file {rest} not found")
        return OpenCVCamera(rest, width, height, fps, loop_file=True)
    if kind == "folder" and rest:
        return FolderCamera(rest, fps, loop=True)
    raise ValueError(f"camera.source={source!r}: expected sim, opencv:<index|url|pipeline>, file:<video> "
                     "or folder:<dir>")
