"""Fixtures for the firmware_bridge tests: a hand-driven MCU world and a simulator+link pair on a real pty."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from firmware_bridge.events import LinkEvent
from firmware_bridge.link import DiverterLink
from firmware_bridge.messages import DiverterSetup
from firmware_bridge.native import NativeFirmware, build_host_firmware
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


@pytest.fixture(autouse=True)
def no_link_outlives_its_test() -> Iterator[None]:
    """Every test closes every link it opened (before its pty goes away): a link left running would keep
    re-opening its port after the test, and a pty's number is soon someone else's terminal."""
    before = {t for t in threading.enumerate() if t.name.startswith("diverter-link ")}
    yield
    deadline = time.monotonic() + 3.0
    while True:
        left = [t.name for t in threading.enumerate()
                if t.name.startswith("diverter-link ") and t not in before and t.is_alive()]
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"link I/O threads still running after the test: {left}; close() every DiverterLink")
        time.sleep(0.02)


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


# --------------------------------------------------------------------------------------------------------
# Two implementations of the MCU behind one small interface, for the conformance suite and fault campaign.
# --------------------------------------------------------------------------------------------------------
MCU_KINDS = ["python-sim", "c-core"]


@dataclass(frozen=True)
class Shot:
    """One actuation as the world saw it (ground truth): an output switched on for a command."""

    diverter: int
    on_count: int
    pulse_ms: int
    command_id: int
    count_when_called: int


class SimMcu:
    """The Python FirmwareSimulator on a ManualEnvironment: the behavioural reference."""

    name = "python-sim"

    def __init__(self, counts_per_s: float = 1000.0) -> None:
        self.env = ManualEnvironment(counts_per_s)
        self.sim = FirmwareSimulator.on_new_pty(self.env)
        self.sim.start()
        assert self.sim.slave_path is not None
        self.slave_path: str = self.sim.slave_path

    @property
    def count(self) -> int:
        return self.env.encoder_count()

    def advance(self, counts: int, dt_us: int | None = None) -> None:
        self.env.advance(counts, dt_us)
        assert self.sim.sync(), "simulator did not complete a pass"

    def sync(self) -> None:
        assert self.sim.sync(), "simulator did not complete a pass"

    def shots(self) -> list[Shot]:
        with self.env._lock:
            hits = list(self.env.hits)
        return [Shot(h.diverter, h.on_count, int(h.pulse_ms), h.command_id, h.count_when_called) for h in hits]

    def reset(self) -> None:
        self.sim.reset()
        self.sync()

    def set_estop(self, active: bool) -> None:
        self.sim.set_estop(active)
        self.sync()

    def drop_rx(self, msg_type: int, count: int = 1) -> None:
        self.sim.drop_rx(msg_type, count)
        self.sync()

    @property
    def boot_id(self) -> int:
        return self.sim.boot_id

    @property
    def configured(self) -> bool:
        return self.sim.configured

    @property
    def queue_depth(self) -> int:
        return self.sim.queue_depth

    @property
    def counts_per_s(self) -> float:
        return self.sim.counts_per_s()

    @property
    def events_pending(self) -> int:
        self.sync()
        return self.sim.events_pending

    @property
    def armed(self) -> bool:
        self.sync()
        return self.sim.armed

    @property
    def belt_running(self) -> bool:
        self.sync()
        return self.sim.belt_running

    def replug(self) -> str:
        """Cable pulled and re-plugged: same MCU (no reset), its port on a new pty; returns the new path."""
        self.slave_path = self.sim.replug()
        return self.slave_path

    def stop(self) -> None:
        self.sim.stop()


class CCoreMcu:
    """The reference firmware's C core (host build) in a manual world driven over its control channel."""

    name = "c-core"

    def __init__(self, binary: Path, counts_per_s: float = 1000.0) -> None:
        self.counts_per_s_nominal = counts_per_s
        self.time_us = 0
        self._count = 0
        self.fw = NativeFirmware(binary)
        self.fw.start()
        assert self.fw.slave_path is not None
        self.slave_path: str = self.fw.slave_path

    @property
    def count(self) -> int:
        return self._count

    def advance(self, counts: int, dt_us: int | None = None) -> None:
        self._count += counts
        self.time_us += int(round(counts * 1e6 / self.counts_per_s_nominal)) if dt_us is None else dt_us
        self.fw.set_world(self._count, self.time_us)

    def sync(self) -> None:
        self.fw.sync()

    def shots(self) -> list[Shot]:
        return [Shot(s.diverter, s.on_count, s.pulse_ms, s.command_id, s.count_now) for s in self.fw.fired()]

    def reset(self) -> None:
        self.fw.reset()

    def set_estop(self, active: bool) -> None:
        self.fw.set_estop(active)

    def drop_rx(self, msg_type: int, count: int = 1) -> None:
        self.fw.drop_rx(int(msg_type), count)

    @property
    def boot_id(self) -> int:
        return self.fw.state()["boot"]

    @property
    def configured(self) -> bool:
        return bool(self.fw.state()["configured"])

    @property
    def queue_depth(self) -> int:
        return self.fw.state()["queue"]

    @property
    def counts_per_s(self) -> float:
        st = self.fw.state()
        return st["rate_dc"] * 1e6 / st["rate_dt"] if st["rate_dt"] > 0 else 0.0

    @property
    def events_pending(self) -> int:
        self.sync()
        return self.fw.state()["events_pending"]

    @property
    def armed(self) -> bool:
        return bool(self.fw.state()["armed"])

    @property
    def belt_running(self) -> bool:
        return bool(self.fw.state()["belt"])

    def replug(self) -> str:
        """Cable pulled and re-plugged: same MCU (no reset), its port on a new pty; returns the new path."""
        self.slave_path = self.fw.replug()
        return self.slave_path

    def stop(self) -> None:
        self.fw.stop()


@pytest.fixture(scope="session")
def c_core_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host build of firmware_bridge/firmware, compiled once per session with -Wall -Wextra -Werror."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler (gcc/cc) on PATH: the C core cannot be built; install gcc to run these")
    return build_host_firmware(tmp_path_factory.mktemp("kozan-mcu-host"))


def make_mcu(kind: str, request: pytest.FixtureRequest) -> SimMcu | CCoreMcu:
    if kind == "python-sim":
        return SimMcu()
    return CCoreMcu(request.getfixturevalue("c_core_binary"))


@pytest.fixture(params=MCU_KINDS)
def mcu(request: pytest.FixtureRequest) -> Iterator[SimMcu | CCoreMcu]:
    """Each MCU implementation on the far end of its own real pseudo-terminal, in a manual world."""
    m = make_mcu(request.param, request)
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture
def linked(mcu: SimMcu | CCoreMcu) -> Iterator[tuple[SimMcu | CCoreMcu, DiverterLink, EventLog]]:
    """The real host link, opened on the MCU's pty (handshake done, not configured)."""
    link = DiverterLink(mcu.slave_path)
    try:
        link.open(timeout=2.0)
        yield mcu, link, EventLog(link)
    finally:
        link.close()


@pytest.fixture
def ready(linked: tuple[SimMcu | CCoreMcu, DiverterLink, EventLog]) -> tuple[SimMcu | CCoreMcu, DiverterLink, EventLog]:
    """Configured (watchdog effectively off: the manual clock jumps), belt measured at 1000 counts/s."""
    mcu, link, log = linked
    link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
    for _ in range(2):  # two encoder samples at distinct times give the MCU its speed
        mcu.advance(10)
    assert mcu.count == 20
    assert mcu.counts_per_s == pytest.approx(1000.0)
    return mcu, link, log


@pytest.fixture(scope="session")
def mcu_factory(request: pytest.FixtureRequest) -> Callable[[str], SimMcu | CCoreMcu]:
    """Makes a fresh MCU of a kind per call: for hypothesis tests, where function-scoped fixtures would be
    shared across examples. The C core's binary (``c_core_binary``) is requested only on first use, so
    the simulator's examples still run where there is no compiler."""

    def make(kind: str) -> SimMcu | CCoreMcu:
        if kind == "python-sim":
            return SimMcu()
        return CCoreMcu(request.getfixturevalue("c_core_binary"))

    return make


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault campaign's counts (faults injected by kind, violations) whenever it ran."""
    import sys

    mod = next((m for name, m in list(sys.modules.items()) if name.endswith("test_fault_campaign")), None)
    if mod is not None and getattr(mod, "REPORT", None):
        terminalreporter.section("fault campaign")
        terminalreporter.write_line(mod.summary())
