"""What the page shows, gathered off the loop: counters, throughput, state, alarms, last items, shift.

A thread of its own builds one JSON-ready snapshot every `push_interval_s` from the station's
counters (copied, never locked against the loop) and hands it to every connected page; the pages
never make the station compute anything. The same thread watches the share of items sent to the
manual path for low confidence and raises an alarm when it is high: a dirty lens, bad light or a
new kind of item looks like that first.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from station.alarms import Severity
from station.config import MANUAL_BIN
from station.hmi.preview import short_name
from station.state import LineState

log = logging.getLogger(__name__)


class LiveMonitor:
    """Builds snapshots; `snapshot()` is the newest, `version` bumps with each."""

    def __init__(self, station: Any, preview: Any, push_interval_s: float, low_conf_rate: float,
                 low_conf_window: int):
        self.station = station
        self.preview = preview
        self.interval = push_interval_s
        self.low_conf_rate = low_conf_rate
        self.low_conf_window = min(low_conf_window, 50)   # core.recent keeps the last 50 decisions
        self.version = 0
        self._snap: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._history: deque[tuple[float, int]] = deque()  # (monotonic s, decided) over the last minute
        self._running_s = 0.0
        self._last_t = time.monotonic()
        self._shift_start_wall = time.time()
        self._shift_start_mono = time.monotonic()
        self._last_low_conf_item: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flagged: set[int] = set()      # items an operator flagged as in the wrong bin
        self.tick()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hmi-live", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snap

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # never let the screen's bookkeeping take anything else down
                log.exception("HMI snapshot failed")

    def _check_low_confidence(self, recent: list[tuple[Any, str]]) -> None:
        window = recent[-self.low_conf_window:]
        if len(window) < self.low_conf_window or not window:
            return
        newest = window[-1][0].track_id
        if newest == self._last_low_conf_item:
            return
        self._last_low_conf_item = newest
        low = sum(1 for d, _ in window if d.reason.value == "low_confidence")
        share = low / len(window)
        if share >= self.low_conf_rate:
            self.station.alarms.raise_(
                "low_confidence_rate", Severity.WARNING,
                f"{low} of the last {len(window)} items were too uncertain to sort ({share:.0%}): "
                "check the lens, the light and what is on the belt", item_id=newest,
                params={"low": low, "n": len(window), "pct": round(share * 100)})

    def tick(self) -> None:
        st = self.station
        now = time.monotonic()
        state = st.state.state
        if state == LineState.RUNNING:
            self._running_s += now - self._last_t
        self._last_t = now
        c = st.core.counters
        for _ in range(3):   # the loop may add a key while we copy: copy again
            try:
                per_bin, per_class, reasons = dict(c.per_bin), dict(c.per_class), dict(c.reasons)
                break
            except RuntimeError:
                continue
        else:
            per_bin, per_class, reasons = {}, {}, {}
        decided = c.decided
        self._history.append((now, decided))
        while self._history and self._history[0][0] < now - 60.0:
            self._history.popleft()
        t0, n0 = self._history[0]
        per_min = (decided - n0) / (now - t0) * 60.0 if now - t0 >= 2.0 else 0.0
        recent = list(st.core.recent)
        self._check_low_confidence(recent)
        cfg = st.cfg
        div_by_bin = {d.bin: d for d in cfg.diverters}
        bins = []
        for b, name in sorted(cfg.rules.bin_names.items()):
            d = div_by_bin.get(b)
            bins.append({"bin": b, "name": name, "count": per_bin.get(b, 0),
                         "diverter": d.id if d is not None else None,
                         "enabled": (d.enabled if d is not None else b == MANUAL_BIN)})
        # per class: every class the model knows (a steady panel from the first second), then any other
        # class counted (a model swapped for one with other classes), with the live view's short code
        # and the bin its rule sends it to
        names = list(getattr(st.detector, "names", ()) or ())
        names += [n for n in per_class if n not in names]
        classes = [{"class": n, "short": short_name(n), "count": per_class.get(n, 0),
                    "bin": cfg.rules.class_to_bin.get(n)} for n in names]
        alarms = [{"id": a.id, "code": a.code, "severity": a.severity.value, "message": a.message,
                   "detail": a.detail or a.code, "params": a.params, "count": a.count, "age_s": round(st.clock.now() - a.last_s, 1)}
                  for a in st.alarms.active()]
        alarms.sort(key=lambda a: (a["severity"] != "fault", -a["id"]))
        items = []
        for d, outcome in reversed(recent[-12:]):
            items.append({"track_id": d.track_id, "class": d.class_name, "confidence": round(d.confidence, 2),
                          "bin": MANUAL_BIN if outcome == "missed" else d.bin, "reason": d.reason.value,
                          "outcome": outcome, "thumb": self.preview.thumb(d.track_id) is not None,
                          "flagged": d.track_id in self.flagged})
        health = st.link.health() if hasattr(st.link, "health") else {}
        rtt = health.get("rtt_ms")
        elapsed = now - self._shift_start_mono
        snap = {
            "state": state.value, "reason": st.state.reason,
            "counters": {"decided": decided, "missed": c.missed, "frames": c.frames, "fired": c.fired,
                         "sent": c.sent, "dropped": st.mailbox.dropped, "per_class": per_class},
            "bins": bins,
            "classes": classes,
            "throughput_per_min": round(per_min, 1),
            "fps": round(st.stats.fps, 1), "latency_ms": round(st.stats.latency_ms_p50, 1),
            "link_rtt_ms": round(rtt, 1) if isinstance(rtt, (int, float)) else None,
            "alarms": alarms,
            "recent": items,
            "manual_next": st.core.sorter.manual_next,
            "preview_seq": self.preview.seq,
            "model": st.core.model_version,
            # the "wrong bin" flag saves the item's frame: offered only when capture is on to save it
            "capture": getattr(st, "capture", None) is not None,
            "shift": {
                "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(self._shift_start_wall)),
                "elapsed_s": round(elapsed), "running_s": round(self._running_s),
                "items": decided, "missed": c.missed,
                "avg_per_min": round(decided / self._running_s * 60.0, 1) if self._running_s > 1 else 0.0,
                "per_bin": {str(k): v for k, v in sorted(per_bin.items())},
                "reasons": reasons, "alarms": st.alarms.counts(),
            },
        }
        with self._lock:
            self._snap = snap
            self.version += 1
