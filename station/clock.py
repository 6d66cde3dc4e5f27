"""Host clocks: the real monotonic clock, and a virtual one for fast, deterministic simulation.

Everything in the loop that needs "now" takes a clock, so the same code runs a real line in real
time and a simulated line in virtual time, where a 10-minute shift takes seconds and the same seed
gives the same result.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


class VirtualClock:
    """Time that moves only when the simulation says so. Thread-safe to read."""

    def __init__(self, start: float = 0.0):
        self._t = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._t

    def advance_to(self, t: float) -> None:
        with self._lock:
            if t < self._t:
                raise ValueError(f"virtual time cannot go back ({t} < {self._t})")
            self._t = t
