"""Dataset capture on the line: the frames that teach the model most, written off the loop.

The loop calls `Capture.on_frame(result)` after each frame; that call only decides (a few
comparisons per decided item) and hands a reference to the frame to a bounded queue. A writer
thread encodes the JPEG and writes three files per capture:

    <dir>/images/<name>.jpg    the full frame, as the camera saw it
    <dir>/labels/<name>.txt    the model's detections in that frame as YOLO pre-labels
    <dir>/meta/<name>.json     time, line time, model version, track id, reasons, the decision

A capture is complete when its meta file exists (it is written last). When the queue is full the
capture is dropped and counted: the loop never waits for the disk. When the folder reaches its
quota, the disk runs short or a write fails, capture stops with an alarm; the line goes on.

Why an item is captured (`reasons`, most telling first):
  wrong_bin       an operator flagged it on the HMI (its frame is kept for `flag_window` items)
  manual          it ended in the manual path (any sorter reason, or a command too late to send)
  low_confidence  its vote-weighted confidence was below `capture.low_confidence`
  disagreement    its runner-up class held at least `capture.disagreement` of its votes
  random          a small random sample of everything else (`capture.random_rate`)
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from station.alarms import AlarmBoard, Severity
from station.config import MANUAL_BIN, CaptureConfig

log = logging.getLogger(__name__)

REASONS = ("wrong_bin", "manual", "low_confidence", "disagreement", "random")


def yolo_label_lines(boxes: np.ndarray, class_ids: np.ndarray, width: int, height: int) -> list[str]:
    """xyxy pixel boxes -> `class cx cy w h` lines, normalised (what ultralytics reads)."""
    out = []
    for (x0, y0, x1, y1), c in zip(np.asarray(boxes, float), np.asarray(class_ids, int)):
        out.append(f"{int(c)} {(x0 + x1) / 2 / width:.6f} {(y0 + y1) / 2 / height:.6f} "
                   f"{(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}")
    return out


@dataclass
class CaptureStats:
    queued: int = 0
    written: int = 0
    dropped_queue_full: int = 0        # the writer was behind: dropped, never waited for
    rate_limited: int = 0              # wanted, but over capture.max_per_min
    failed: int = 0
    bytes: int = 0                     # written by this run
    per_reason: Counter = field(default_factory=Counter)
    stopped: str | None = None         # why capture stopped (quota, disk, write error)

    def as_dict(self) -> dict[str, Any]:
        return {"queued": self.queued, "written": self.written, "dropped_queue_full": self.dropped_queue_full,
                "rate_limited": self.rate_limited, "failed": self.failed, "bytes": self.bytes,
                "per_reason": dict(self.per_reason), "stopped": self.stopped}


@dataclass
class _Job:
    name: str
    image: np.ndarray
    boxes: np.ndarray
    class_ids: np.ndarray
    scores: np.ndarray
    meta: dict[str, Any]


def folder_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


class Capture:
    """Chooses frames on the loop thread, writes them on its own. `close()` drains and stops."""

    def __init__(self, cfg: CaptureConfig, root: Path, names: tuple[str, ...], alarms: AlarmBoard,
                 model_version: Callable[[], str], truth: Callable[[], list] | None = None,
                 wall_clock: Callable[[], float] = time.time, wait_for_writer: bool = False,
                 run_id: str | None = None):
        self.cfg = cfg
        # Virtual time (`kozan sim --fast`, tests) has no frame deadline, so a writer that falls behind
        # costs nothing the line would feel there: wait for it rather than drop, and the set of captures
        # stays a function of the seed instead of the machine's load. A real line never waits.
        self.wait_for_writer = wait_for_writer
        self.root = Path(root)
        self.names = tuple(names)
        self.alarms = alarms
        self.model_version = model_version
        self.truth = truth                 # the simulated line's ground truth (the labeller's key); None on a line
        self.wall = wall_clock
        self.stats = CaptureStats()
        # in every capture's name; `kozan dataset split` keeps a run's track together by it
        self.run_id = run_id or uuid.uuid4().hex[:6]
        self._rng = np.random.default_rng(cfg.seed)
        self._n = 0
        self._tokens = 1.0
        self._last_t: float | None = None
        self._recent: OrderedDict[int, tuple[Any, Any, dict]] = OrderedDict()   # track id -> kept for a flag
        self._flag_lock = threading.Lock()
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=cfg.queue)
        for sub in ("images", "labels", "meta"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._used = folder_bytes(self.root)
        self._thread = threading.Thread(target=self._writer, name="capture-writer", daemon=True)
        self._thread.start()

    # ---- the loop's side (must stay cheap) ---------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.stats.stopped is None

    def reasons_for(self, d: Any, outcome: str) -> list[str]:
        c = self.cfg
        why = []
        if c.manual and (d.bin == MANUAL_BIN or outcome == "missed"):
            why.append("manual")
        if d.confidence < c.low_confidence:
            why.append("low_confidence")
        total = sum(d.votes.values())
        if total > 0 and len(d.votes) > 1:
            runner_up = sorted(d.votes.values())[-2]
            if runner_up / total >= c.disagreement:
                why.append("disagreement")
        return why

    def _allow(self, t: float) -> bool:
        """Token bucket on line time: `max_per_min`, bursts of up to a few captures."""
        rate = self.cfg.max_per_min / 60.0
        burst = max(1.0, min(5.0, rate * 10))
        if self._last_t is not None:
            self._tokens = min(burst, self._tokens + (t - self._last_t) * rate)
        self._last_t = t
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def on_frame(self, res: Any, outcomes: dict[int, str] | None = None) -> None:
        """After a frame: capture decided items that are worth it. Never raises; never blocks on a line."""
        if not res.decisions or not self.active:
            return
        try:
            t = res.frame.t_ns / 1e9
            for d in res.decisions:
                outcome = (outcomes or {}).get(d.track_id, "manual" if d.bin == MANUAL_BIN else "sent")
                meta = self._decision_meta(d, outcome)
                if self.cfg.flag_window:
                    with self._flag_lock:
                        self._recent[d.track_id] = (res.frame, res.detections, meta)
                        while len(self._recent) > self.cfg.flag_window:
                            self._recent.popitem(last=False)
                why = self.reasons_for(d, outcome)
                if not why and self._rng.random() < self.cfg.random_rate:
                    why = ["random"]
                if not why:
                    continue
                if not self._allow(t):
                    self.stats.rate_limited += 1
                    continue
                self._enqueue(res.frame, res.detections, meta, why)
        except Exception:  # capture is never worth a line stop
            log.exception("capture: choosing frames failed (ignored)")

    def flag_wrong_bin(self, track_id: int, note: str = "") -> str:
        """An operator says item `track_id` went to the wrong bin: capture its frame (no rate limit)."""
        with self._flag_lock:
            kept = self._recent.get(track_id)
        if kept is None:
            raise KeyError(f"item {track_id}: its frame is no longer kept (only the last "
                           f"{self.cfg.flag_window} items are); nothing captured")
        if not self.active:
            raise RuntimeError(f"capture is stopped ({self.stats.stopped}); item {track_id} not saved")
        frame, det, meta = kept
        meta = dict(meta, operator_note=note)
        name = self._enqueue(frame, det, meta, ["wrong_bin"])
        if name is None:
            raise RuntimeError("the capture writer is behind (queue full); try again in a moment")
        log.info("item %d: flagged wrong bin by the operator, captured as %s", track_id, name)
        return name

    def _decision_meta(self, d: Any, outcome: str) -> dict[str, Any]:
        return {"track_id": d.track_id, "class": d.class_name, "confidence": round(float(d.confidence), 4),
                "votes": d.votes, "bin": d.bin, "decision_reason": d.reason.value, "outcome": outcome}

    def _enqueue(self, frame: Any, det: Any, meta: dict, why: list[str]) -> str | None:
        self._n += 1
        wall = self.wall()
        name = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(wall))}_{self.run_id}_{self._n:05d}_t{meta['track_id']}"
        h, w = frame.image.shape[:2]
        full = dict(meta, reason=why[0], reasons=why, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall)),
                    line_time_s=round(frame.t_ns / 1e9, 3), frame_seq=frame.seq, belt_count=frame.belt_count,
                    model_version=self.model_version(), width=w, height=h, names=list(self.names),
                    labels="model")
        if self.truth is not None:
            full["sim_truth"] = [[n, *[round(float(v), 1) for v in b]] for n, b in self.truth()]
        job = _Job(name, frame.image, det.boxes.copy(), det.class_ids.copy(), det.scores.copy(), full)
        try:
            if self.wait_for_writer:
                self._q.put(job, timeout=30.0)
            else:
                self._q.put_nowait(job)
        except queue.Full:
            self.stats.dropped_queue_full += 1
            return None
        self.stats.queued += 1
        return name

    # ---- the writer thread ----------------------------------------------------------------------
    def _stop(self, why: str, message: str, **params: object) -> None:
        if self.stats.stopped is None:
            self.stats.stopped = why
            self.alarms.raise_("capture_stopped", Severity.WARNING, message, detail=f"capture_stopped.{why}",
                               params={"folder": str(self.root), **params})
            log.error("capture stopped: %s", message)

    def _writer(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if not self.active:
                continue
            try:
                self._write(job)
            except OSError as e:
                self.stats.failed += 1
                self._stop("write_error", f"dataset capture stopped: writing {self.root} failed ({e.strerror or e}); "
                                          "the line goes on — free space or fix the folder, then restart capture",
                           error=e.strerror or str(e))
            except Exception:
                self.stats.failed += 1
                log.exception("capture: writing %s failed", job.name)

    def _write(self, job: _Job) -> None:
        ok, jpg = cv2.imencode(".jpg", job.image, [cv2.IMWRITE_JPEG_QUALITY, self.cfg.jpeg_quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        h, w = job.image.shape[:2]
        labels = ("\n".join(yolo_label_lines(job.boxes, job.class_ids, w, h)) + "\n").encode()
        job.meta["prelabel_scores"] = [round(float(s), 4) for s in job.scores]
        meta = json.dumps(job.meta, indent=1).encode()
        size = len(jpg) + len(labels) + len(meta)
        quota = self.cfg.quota_mb * 1e6
        if self._used + size > quota:
            self._stop("quota", f"dataset capture stopped: {self.root} holds {self._used / 1e6:.0f} MB of its "
                                f"{self.cfg.quota_mb:.0f} MB quota (capture.quota_mb); the line goes on — move the "
                                "captures away (`kozan dataset export`) or raise the quota",
                       used_mb=round(self._used / 1e6), quota_mb=round(self.cfg.quota_mb))
            return
        free = shutil.disk_usage(self.root).free
        if free - size < self.cfg.min_free_mb * 1e6:
            self._stop("disk", f"dataset capture stopped: only {free / 1e6:.0f} MB free on the disk of {self.root} "
                               f"(capture.min_free_mb={self.cfg.min_free_mb:.0f}); the line goes on",
                       free_mb=round(free / 1e6), min_free_mb=round(self.cfg.min_free_mb))
            return
        for sub, data, ext in (("images", jpg.tobytes(), ".jpg"), ("labels", labels, ".txt"), ("meta", meta, ".json")):
            p = self.root / sub / f"{job.name}{ext}"
            tmp = p.with_name(p.name + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, p)
        self._used += size
        self.stats.bytes += size
        self.stats.written += 1
        for r in job.meta["reasons"]:
            self.stats.per_reason[r] += 1

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            log.warning("capture: writer did not drain in %.0f s", timeout)
        self._thread.join(timeout=timeout)


def open_capture(cfg: Any, names: tuple[str, ...], alarms: AlarmBoard, model_version: Callable[[], str],
                 truth: Callable[[], list] | None = None, root: Path | None = None,
                 wait_for_writer: bool = False, run_id: str | None = None) -> Capture | None:
    """A `Capture` when `capture.enabled`, else None. A folder that cannot be made stops capture, not the line."""
    if not cfg.capture.enabled:
        return None
    root = Path(root) if root is not None else cfg.resolve(cfg.capture.dir)
    try:
        return Capture(cfg.capture, root, names, alarms, model_version, truth, wait_for_writer=wait_for_writer,
                       run_id=run_id)
    except OSError as e:
        alarms.raise_("capture_stopped", Severity.WARNING,
                      f"dataset capture off: cannot use {root} ({e.strerror or e}); the line runs without it",
                      detail="capture_stopped.no_folder", params={"folder": str(root), "error": e.strerror or str(e)})
        return None
