"""The live view and the item thumbnails, drawn and encoded in a thread of their own.

The loop's only contact with this module is `PreviewWorker.hook`, which stores a reference to the
frame result (and, when the frame decided items, appends it to a short deque) and returns: no copy,
no drawing, no encoding on the loop's time. The worker wakes at most `preview_fps` times a second,
downscales the newest frame to `preview_width` first (drawing on the small image is cheaper), and
encodes JPEG; frames that arrive between two wake-ups are simply never looked at. While no page is
watching, the live view is not encoded at all; thumbnails are (small crops, one per decided item),
so the page shows the last items as soon as it opens.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import cv2
import numpy as np

from station.config import MANUAL_BIN

log = logging.getLogger(__name__)

# BGR colours per bin; the page uses the same hues, and every box also carries its text label
BIN_COLOURS: dict[int, tuple[int, int, int]] = {
    0: (200, 200, 200), 1: (60, 60, 230), 2: (40, 160, 240), 3: (80, 200, 60), 4: (220, 160, 40),
}
_UNDECIDED = (255, 255, 255)

# The live view is one JPEG for every open page, whatever language each page shows, and OpenCV's
# Hershey fonts draw ASCII only (no kana, kanji or Thai): so a box is labelled with a short code that
# reads the same in every language plant (industry abbreviations and chemical symbols), and the
# page's per-class panel is the legend, naming each code's class in the page's language.
SHORT_NAMES: dict[str, str] = {
    "board_high": "PCB-H", "board_low": "PCB-L", "li_ion_cell": "Li-C", "li_ion_pack": "Li-P",
    "alkaline": "Alk", "nimh": "NiMH", "coin_cell": "Coin", "lead_acid": "Pb", "unknown": "?",
}


def short_name(name: str) -> str:
    """The live view's label for a class: its short code, or (a model with other classes) the name cut short."""
    return SHORT_NAMES.get(name) or name[:6]


class PreviewWorker:
    """Owns the encoded live-view JPEG and a bounded set of item thumbnails."""

    def __init__(self, station: Any, fps: float, width: int, thumbs: int = 48, thumb_height: int = 112):
        self.station = station
        self.period = 1.0 / fps
        self.width = width
        self.thumb_height = thumb_height
        self._max_thumbs = thumbs
        self._latest: Any = None                       # FrameResult, set by the loop thread
        self._decided: deque[Any] = deque(maxlen=16)   # FrameResults with decisions, for thumbnails
        self._lock = threading.Lock()
        self._jpeg: bytes | None = None
        self.seq = 0                                   # bumps with each new live-view JPEG
        self.thumbs: OrderedDict[int, bytes] = OrderedDict()
        self.viewers = 0                               # pages streaming; set by the server
        self.encoded = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: Any = None
        geom = station.core.geom
        self._h_inv = np.linalg.inv(geom.homography)
        self._names = tuple(station.detector.names)

    # ---- the loop's side: stash and return ------------------------------------------------------
    def hook(self, res: Any) -> None:
        """Called on the loop thread for every processed frame: keeps references only."""
        self._latest = res
        if res.decisions:
            self._decided.append(res)

    # ---- the worker thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hmi-preview", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def jpeg(self) -> tuple[int, bytes | None]:
        with self._lock:
            return self.seq, self._jpeg

    def thumb(self, track_id: int) -> bytes | None:
        with self._lock:
            return self.thumbs.get(track_id)

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if next_t > now:
                self._stop.wait(next_t - now)
            next_t = max(next_t + self.period, time.monotonic())
            try:
                while self._decided:
                    self._thumbnails(self._decided.popleft())
                res = self._latest
                if res is not None and res is not self._done and self.viewers > 0:
                    self._done = res
                    data = self.render(res)
                    with self._lock:
                        self._jpeg = data
                        self.seq += 1
                    self.encoded += 1
            except Exception:  # a drawing bug must cost the live view, never the station
                log.exception("HMI preview failed (the line goes on)")

    # ---- drawing ---------------------------------------------------------------------------------
    def _mm_to_px(self, pts_mm: np.ndarray) -> np.ndarray:
        p = np.c_[np.asarray(pts_mm, np.float64).reshape(-1, 2), np.ones(len(pts_mm))] @ self._h_inv.T
        return p[:, :2] / p[:, 2:3]

    def _decided_bins(self) -> dict[int, int]:
        return {d.track_id: (MANUAL_BIN if outcome == "missed" else d.bin)
                for d, outcome in list(self.station.core.recent)}

    def render(self, res: Any) -> bytes:
        """Downscale, then draw boxes with track id, class and bin decision; JPEG bytes."""
        img = res.frame.image
        h, w = img.shape[:2]
        s = self.width / w
        small = cv2.resize(img, (self.width, max(1, int(round(h * s)))), interpolation=cv2.INTER_AREA)
        geom = self.station.core.geom
        det = res.detections
        bins = self._decided_bins()
        # which track each detection belongs to: nearest seen track centre in belt mm
        ids = [-1] * len(det)
        if len(det) and res.tracks:
            c_mm = geom.px_to_mm(det.centers)
            t_xy = np.array([[tr.x_at(res.count, geom), tr.y_mm] for tr in res.tracks])
            dist = np.hypot(c_mm[:, None, 0] - t_xy[None, :, 0], c_mm[:, None, 1] - t_xy[None, :, 1])
            for i in range(len(det)):
                j = int(np.argmin(dist[i]))
                if dist[i, j] < 60.0:
                    ids[i] = res.tracks[j].id
        # the decision line: items are judged when they cross it
        x_line = self._mm_to_px(np.array([[self.station.cfg.line.decision_line_mm, 0.0]]))[0, 0] * s
        cv2.line(small, (int(x_line), 0), (int(x_line), small.shape[0]), (0, 255, 255), 1, cv2.LINE_AA)
        for i in range(len(det)):
            x0, y0, x1, y1 = (det.boxes[i] * s).astype(int).tolist()
            tid = ids[i]
            b = bins.get(tid) if tid >= 0 else None
            col = BIN_COLOURS.get(b, (255, 0, 255)) if b is not None else _UNDECIDED
            cv2.rectangle(small, (x0, y0), (x1, y1), col, 2 if b is not None else 1)
            cid = int(det.class_ids[i])
            name = short_name(self._names[cid]) if 0 <= cid < len(self._names) else str(cid)
            label = (f"#{tid} " if tid >= 0 else "") + name + (f" >B{b}" if b is not None else "")
            (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            ty = max(th + 2, y0)
            cv2.rectangle(small, (x0, ty - th - 3), (x0 + tw + 2, ty), (0, 0, 0), -1)
            cv2.putText(small, label, (x0 + 1, ty - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, col, 1, cv2.LINE_AA)
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 70])
        if not ok:
            raise RuntimeError("JPEG encoding of the live view failed")
        return buf.tobytes()

    def _thumbnails(self, res: Any) -> None:
        """One crop per item decided in this frame, from the item's tracked extent on the belt."""
        geom = self.station.core.geom
        img = res.frame.image
        h, w = img.shape[:2]
        tracks = {tr.id: tr for tr in res.tracks}
        tracks.update({k: v for k, v in self.station.core.tracker.tracks.items() if k not in tracks})
        for d in res.decisions:
            tr = tracks.get(d.track_id)
            if tr is None:
                continue
            x = tr.x_at(res.count, geom)
            half_l, half_w = tr.length_mm / 2 + 8, tr.width_mm / 2 + 8
            px = self._mm_to_px(np.array([[x - half_l, tr.y_mm - half_w], [x + half_l, tr.y_mm + half_w]]))
            x0, y0 = np.floor(px.min(0)).astype(int)
            x1, y1 = np.ceil(px.max(0)).astype(int)
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            if x1 - x0 < 4 or y1 - y0 < 4:
                continue
            crop = img[y0:y1, x0:x1]
            s = self.thumb_height / crop.shape[0]
            tw = max(1, min(int(round(crop.shape[1] * s)), 2 * self.thumb_height))
            small = cv2.resize(crop, (tw, self.thumb_height), interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 75])
            if not ok:
                continue
            with self._lock:
                self.thumbs[d.track_id] = buf.tobytes()
                while len(self.thumbs) > self._max_thumbs:
                    self.thumbs.popitem(last=False)
