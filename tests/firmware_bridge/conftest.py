"""Fixtures for the firmware_bridge tests: a hand-driven MCU world and a simulator+link pair on a real pty."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from firmware_bridge.events import LinkEvent
from firmware_bridge.link import DiverterLink
from firmware_bridge.messages import DiverterSetup
from firmware_bridge.simulator import FirmwareSimulator


@dataclass(frozen=True)
class Hit:
    diverter: int
    on_count: int
    pulse_ms: float
    command_id: int
    count_when_called: int


class ManualEnvironment:
    """MCU world whose clock and encoder move only when the test says so: deterministic firing."""

    def __init__(self, counts_per_s: float = 1000.0) -> None:
        self._lock = threading.Lock()
        self.time_us = 0
        self.count = 0
        self.counts_per_s = counts_per_s
        self.hits: list[Hit] = []

    def mcu_time_us(self) -> int:
        with self._lock:
            return self.time_us

    def encoder_count(self) -> int:
        with self._lock:
            return self.count

    def actuate(self, diverter: int, on_count: int, pulse_ms: float, command_id: int) -> None:
        with self._lock:
            self.hits.append(Hit(diverter, on_count, pulse_ms, command_id, self.count))

    def advance(self, counts: int, dt_us: int | None = None) -> None:
        """Move the belt ``counts`` forward; by default time moves with it at ``counts_per_s``."""
        with self._lock:
            self.count += counts
            self.time_us += int(round(counts * 1e6 / self.counts_per_s)) if dt_us is None else dt_us


class EventLog:
    """Collects a link's events so a test can wait for one without losing the others."""

    def __init__(self, link: DiverterLink) -> None:
        self.link = link
        self.events: list[LinkEvent] = []

    def drain(self) -> list[LinkEvent]:
        self.events.extend(self.link.poll_events())
        return self.events

    def wait_for(self, predicate: Callable[[LinkEvent], bool], timeout: float = 1.0) -> LinkEvent:
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.drain():
                if predicate(ev):
                    return ev
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event within {timeout} s; got {self.events}")
            time.sleep(0.002)

    def of_type(self, cls: type) -> list[LinkEvent]:
        return [e for e in self.drain() if isinstance(e, cls)]


DIVERTERS = [
    DiverterSetup(id=0, latency_us=20_000, max_on_ms=100),  # 20 ms ahead = 20 counts at 1000 counts/s
    DiverterSetup(id=1, latency_us=0, max_on_ms=50),
]


@pytest.fixture
def manual_env() -> ManualEnvironment:
    return ManualEnvironment()


@pytest.fixture
def sim_link(manual_env: ManualEnvironment) -> Iterator[tuple[FirmwareSimulator, DiverterLink, EventLog]]:
    sim = FirmwareSimulator.on_new_pty(manual_env)
    sim.start()
    assert sim.slave_path is not None
    link = DiverterLink(sim.slave_path)
    try:
        link.open(timeout=2.0)
        yield sim, link, EventLog(link)
    finally:
        link.close()
        sim.stop()


@pytest.fixture
def configured(
    sim_link: tuple[FirmwareSimulator, DiverterLink, EventLog], manual_env: ManualEnvironment
) -> tuple[FirmwareSimulator, DiverterLink, EventLog]:
    """Configured (watchdog effectively off), belt moving at 1000 counts/s as measured by the MCU."""
    sim, link, log = sim_link
    link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
    for _ in range(2):  # two encoder samples at distinct times give the MCU its speed
        manual_env.advance(10)
        assert sim.sync()
    assert sim.counts_per_s() == pytest.approx(1000.0)
    return sim, link, log
