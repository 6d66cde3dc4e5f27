"""The physical world as the MCU sees it: a clock, an encoder, and outputs.

The firmware simulator talks to the world only through :class:`McuEnvironment`, so the same simulator runs
against wall time (technicians, the real-time simulated line) and virtual time (tests, experiments).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class McuEnvironment(Protocol):
    """What the MCU can observe and do. Implementations must be thread-safe (the simulator has a thread)."""

    def mcu_time_us(self) -> int:
        """The MCU's own clock in microseconds (may be virtual time)."""
        ...

    def encoder_count(self) -> int:
        """Current belt encoder count (the MCU owns the encoder)."""
        ...

    def actuate(self, diverter: int, on_count: int, pulse_ms: float, command_id: int) -> None:
        """Switch ``diverter`` on for ``pulse_ms``, exactly when the belt reaches ``on_count``.

        Called at most once per command, possibly after the belt has already passed ``on_count`` (the
        simulator polls; real firmware uses a compare ISR), so the world must judge the hit at ``on_count``.
        """
        ...


@dataclass(frozen=True)
class Actuation:
    diverter: int
    on_count: int
    pulse_ms: float
    command_id: int
    mcu_time_us: int


class ConstantSpeedEnvironment:
    """A belt without an encoder: position derived from a configured speed; actuations are only logged.

    Used by ``python -m firmware_bridge.simulator`` and real-time tests. The clock is injectable so that a
    virtual clock can drive it.
    """

    def __init__(
        self,
        mm_per_count: float,
        speed_mm_s: float,
        clock: Callable[[], float] = time.monotonic,
        history: int = 1000,
    ) -> None:
        if not (mm_per_count > 0 and math.isfinite(mm_per_count)):
            raise ValueError(f"mm_per_count must be a positive number, got {mm_per_count!r}")
        if not math.isfinite(speed_mm_s):
            raise ValueError(f"speed_mm_s must be finite, got {speed_mm_s!r}")
        self.mm_per_count = mm_per_count
        self.speed_mm_s = speed_mm_s
        self._clock = clock
        self._t0 = clock()
        self._lock = threading.Lock()
        self.actuations: deque[Actuation] = deque(maxlen=history)

    @property
    def counts_per_s(self) -> float:
        return self.speed_mm_s / self.mm_per_count

    def count_at(self, t: float) -> float:
        """Exact (fractional) belt count at clock time ``t`` — ground truth for tests."""
        return (t - self._t0) * self.counts_per_s

    def mcu_time_us(self) -> int:
        return int((self._clock() - self._t0) * 1e6)

    def encoder_count(self) -> int:
        return math.floor(self.count_at(self._clock()))

    def actuate(self, diverter: int, on_count: int, pulse_ms: float, command_id: int) -> None:
        act = Actuation(diverter, on_count, pulse_ms, command_id, self.mcu_time_us())
        with self._lock:
            self.actuations.append(act)
        log.info(
            "command %d: diverter %d on at count %d for %.1f ms", command_id, diverter, on_count, pulse_ms
        )
