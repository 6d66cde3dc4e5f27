"""The host's estimate of the MCU clock (offset and drift), from the MCU timestamps it already receives.

Why: the MCU stamps every EncoderReport with its own clock, so belt position as a function of *MCU* time is
exact (no transport jitter). What the host needs is the other half: which MCU time a host instant (a frame's
capture time) corresponds to. Klipper's ``clocksync.py`` answers this with a regression of MCU time against
host time; this does the same from the one-way reports (EncoderReport, Heartbeat) instead of round trips.

Each report arrives ``delay`` after the MCU sent it, and ``delay`` is never below the transport's minimum:
receive times sit *above* a line, never below it. So the fit is a lower envelope, not a plain least-squares
line: fit, keep the faster half (residual at or below the median), fit again, twice. Late outliers (the GIL,
a busy core, a USB frame boundary) then do not bend the line. What is left in the offset is the minimum
one-way delay (tens of µs on a pty; about one USB frame on USB-CDC), a constant that costs < 0.1 mm at
1 m/s. ``drift_ppm`` is the MCU crystal's rate error against the host clock.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

ENVELOPE_PASSES = 2  # each keeps the faster half of the samples


class McuClockNotReady(RuntimeError):
    """Too few MCU timestamps (or all at one instant) to estimate the MCU clock yet."""


@dataclass(frozen=True)
class ClockEstimate:
    """``mcu_us(host_s) = mcu_ref_us + rate * (host_s - host_ref_s) * 1e6``."""

    host_ref_s: float
    mcu_ref_us: float
    rate: float  # MCU µs per host µs
    samples: int
    residual_median_us: float  # receive-time residuals of every sample in the window against the line
    residual_p99_us: float

    @property
    def drift_ppm(self) -> float:
        """How fast the MCU clock runs against the host's, in parts per million (+: MCU fast)."""
        return (self.rate - 1.0) * 1e6

    @property
    def offset_us(self) -> float:
        """MCU time minus host time (µs) at the window's reference instant."""
        return self.mcu_ref_us - self.host_ref_s * 1e6


class McuClock:
    """Sliding-window lower-envelope fit of (host receive time s, MCU time µs). Thread-safe.

    ``window`` samples (500 = 10 s of 20 ms EncoderReports: long enough to see drift of a few ppm, short
    enough to follow a crystal warming up). The fit is redone lazily, at most every ``refit_every`` samples.
    """

    def __init__(self, window: int = 500, min_samples: int = 10, refit_every: int = 10) -> None:
        if window < min_samples or min_samples < 2:
            raise ValueError(f"McuClock needs window >= min_samples >= 2, got {window}, {min_samples}")
        self._samples: deque[tuple[float, int]] = deque(maxlen=window)
        self._min = min_samples
        self._refit_every = max(1, refit_every)
        self._new = 0
        self._fit: ClockEstimate | None = None
        self._lock = threading.Lock()

    def add(self, host_time_s: float, mcu_time_us: int) -> None:
        with self._lock:
            self._samples.append((float(host_time_s), int(mcu_time_us)))
            self._new += 1

    def reset(self) -> None:
        """Forget everything (the MCU reset: its clock restarted)."""
        with self._lock:
            self._samples.clear()
            self._fit = None
            self._new = 0

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def ready(self) -> bool:
        return self.estimate_or_none() is not None

    def estimate(self) -> ClockEstimate:
        fit = self.estimate_or_none()
        if fit is None:
            raise McuClockNotReady(
                f"MCU clock estimate has {len(self._samples)} timestamp(s), needs {self._min} at different "
                "times: let the link run a little longer (EncoderReports arrive every report_interval_ms)."
            )
        return fit

    def estimate_or_none(self) -> ClockEstimate | None:
        with self._lock:
            if len(self._samples) < self._min:
                return None
            if self._fit is None or self._new >= self._refit_every:
                self._fit = _envelope_fit(list(self._samples)) or self._fit
                self._new = 0
            return self._fit

    def mcu_time_us_at(self, host_time_s: float) -> float:
        """Estimated MCU clock (µs) at host time ``host_time_s`` (the link's clock, seconds)."""
        e = self.estimate()
        return e.mcu_ref_us + e.rate * (host_time_s - e.host_ref_s) * 1e6

    def host_time_at(self, mcu_time_us: float) -> float:
        """Host time (s) at which the MCU clock reads ``mcu_time_us``."""
        e = self.estimate()
        return e.host_ref_s + (mcu_time_us - e.mcu_ref_us) / e.rate / 1e6


def _envelope_fit(samples: list[tuple[float, int]]) -> ClockEstimate | None:
    """Host receive time against MCU time (the MCU stamp is exact, the receive time carries the delay)."""
    host = np.array([s[0] for s in samples], dtype=np.float64)
    mcu = np.array([s[1] for s in samples], dtype=np.float64)
    host_ref, mcu_ref = host[-1], mcu[-1]  # centre on the newest sample: precision, and it is where we map
    x = (mcu - mcu_ref) * 1e-6  # s of MCU time
    y = host - host_ref  # s of host time
    keep = np.ones(len(x), dtype=bool)
    line = None
    for i in range(ENVELOPE_PASSES + 1):
        if np.ptp(x[keep]) <= 0.0:
            return None
        line = np.polyfit(x[keep], y[keep], 1)  # host_s = a * mcu_s + b
        if i < ENVELOPE_PASSES:
            r = y - np.polyval(line, x)
            cut = np.median(r[keep])
            faster = keep & (r <= cut)
            if faster.sum() < 2:
                break
            keep = faster
    assert line is not None
    a, b = float(line[0]), float(line[1])
    if a <= 0.0:
        return None
    residual = np.abs(y - (a * x + b)) * 1e6
    # host_s - host_ref = a * (mcu_s - mcu_ref) + b  =>  at host_ref the MCU reads mcu_ref - b / a
    return ClockEstimate(
        host_ref_s=float(host_ref),
        mcu_ref_us=float(mcu_ref - b / a * 1e6),
        rate=1.0 / a,
        samples=len(samples),
        residual_median_us=float(np.median(residual)),
        residual_p99_us=float(np.percentile(residual, 99)),
    )
