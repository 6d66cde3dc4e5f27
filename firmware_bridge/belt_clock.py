"""Host time → belt encoder count, from the MCU's EncoderReports.

Why a regression and not the last report: each report reaches the host with a jittery delay (USB frames,
the GIL, the reader thread's poll). A least-squares line through the last N (receive time, count) pairs
averages that jitter out and gives the belt speed for free; a window (not all history) lets it follow
slow speed changes. Klipper's clocksync does the same for its MCU clock.
"""

from __future__ import annotations

import threading
from collections import deque


class BeltClockNotReady(RuntimeError):
    """Fewer than two encoder reports at distinct times: no mapping yet."""


class BeltClock:
    """Sliding-window least-squares fit of encoder count against host receive time (seconds)."""

    def __init__(self, window: int = 50) -> None:
        if window < 2:
            raise ValueError(f"BeltClock window must be at least 2 reports, got {window}")
        self._samples: deque[tuple[float, int]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._fit: tuple[float, float, float] | None = None  # (t_mean, count_mean, slope)
        self._dirty = False

    def add(self, host_time_s: float, count: int) -> None:
        with self._lock:
            self._samples.append((host_time_s, count))
            self._dirty = True

    def reset(self) -> None:
        """Forget everything (MCU reset: its counter restarted)."""
        with self._lock:
            self._samples.clear()
            self._fit = None
            self._dirty = False

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def ready(self) -> bool:
        return self._get_fit() is not None

    @property
    def counts_per_s(self) -> float:
        """Belt speed in counts per second (slope of the fit)."""
        return self._require()[2]

    def count_at(self, host_time_s: float) -> float:
        """Estimated (fractional) encoder count at host monotonic time ``host_time_s``."""
        t_mean, c_mean, slope = self._require()
        return c_mean + slope * (host_time_s - t_mean)

    def time_at(self, count: float) -> float:
        """Host time at which the belt reaches ``count``; raises if the belt is not moving."""
        t_mean, c_mean, slope = self._require()
        if slope == 0.0:
            raise BeltClockNotReady("the belt is not moving: no time can be predicted for a count")
        return t_mean + (count - c_mean) / slope

    def _require(self) -> tuple[float, float, float]:
        fit = self._get_fit()
        if fit is None:
            raise BeltClockNotReady(
                f"belt clock has {len(self._samples)} encoder report(s); it needs two at different times. "
                "Wait for the link to run a little longer, or check that the MCU sends EncoderReports "
                "(report_interval_ms in Configure)."
            )
        return fit

    def _get_fit(self) -> tuple[float, float, float] | None:
        with self._lock:
            if self._dirty:
                self._fit = _least_squares(list(self._samples))
                self._dirty = False
            return self._fit


def _least_squares(samples: list[tuple[float, int]]) -> tuple[float, float, float] | None:
    n = len(samples)
    if n < 2:
        return None
    t_mean = sum(t for t, _ in samples) / n
    c_mean = sum(c for _, c in samples) / n
    # Centred sums keep precision with large monotonic times and counts.
    stt = sum((t - t_mean) ** 2 for t, _ in samples)
    if stt <= 0.0:
        return None
    stc = sum((t - t_mean) * (c - c_mean) for t, c in samples)
    return t_mean, c_mean, stc / stt
