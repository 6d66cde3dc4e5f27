"""What only the C firmware models: outputs switching *off* (pulse end, max on-time, watchdog, e-stop).

The Python simulator reports an actuation as one event with a pulse length; the C core drives real output
levels, so the host build reports every switch, on and off, with the MCU time. These tests hold the
safety rules on output levels: never on longer than max_on_ms, off at once on watchdog and e-stop.
"""

from __future__ import annotations

import time

import pytest

from firmware_bridge import DiverterLink, DiverterSetup, FaultCode, FaultEvent
from firmware_bridge.native import NativeFirmware, NativeFirmwareError, OutputSwitch

DIVERTERS = [DiverterSetup(0, 0, 30), DiverterSetup(1, 0, 50)]


class World:
    """A manual world for the host build: 1 count per ms."""

    def __init__(self, fw: NativeFirmware) -> None:
        self.fw = fw
        self.count = 0
        self.time_us = 0

    def step(self, ms: int) -> None:
        self.count += ms
        self.time_us += ms * 1000
        self.fw.set_world(self.count, self.time_us)

    def switches(self, diverter: int) -> list[OutputSwitch]:
        return [s for s in list(self.fw.switches) if s.diverter == diverter]


@pytest.fixture
def world(c_core_binary):
    fw = NativeFirmware(c_core_binary)
    fw.start()
    link = DiverterLink(fw.slave_path)
    try:
        link.open(timeout=2.0)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        w = World(fw)
        w.step(1)
        w.step(1)
        yield w, link
    finally:
        link.close()
        fw.stop()


def test_pulse_switches_off_after_pulse_ms_of_mcu_time(world) -> None:
    w, link = world
    link.fire_at(1, 1, belt_count=w.count + 10, pulse_ms=20)
    assert link.wait_settled(1.0)
    for _ in range(40):
        w.step(1)
    on, off = w.switches(1)
    assert on.on and (on.on_count, on.command_id, on.pulse_ms) == (w.count - 40 + 10, 1, 20)
    assert not off.on and off.mcu_time_us - on.mcu_time_us == 20_000


def test_back_to_back_pulses_never_exceed_max_on_ms(world) -> None:
    w, link = world
    base = w.count
    for i, cid in enumerate((10, 11, 12)):  # each 25 ms, 15 ms apart: would hold the valve 55 ms
        link.fire_at(cid, 0, belt_count=base + 10 + 15 * i, pulse_ms=25)
    assert link.wait_settled(1.0)
    for _ in range(100):
        w.step(1)
    sw = w.switches(0)
    first_on = next(s for s in sw if s.on)
    first_off = next(s for s in sw if not s.on)
    assert first_off.mcu_time_us - first_on.mcu_time_us <= 30_000  # max_on_ms of diverter 0
    assert [s.command_id for s in sw if s.on] == [10, 11, 12]  # every command was still fired


def test_watchdog_switches_an_open_valve_off(world) -> None:
    w, link = world
    link.configure(0.5, DIVERTERS, watchdog_ms=20)  # shorter than the pulse, so the watchdog cuts it
    link.fire_now(20, 1, pulse_ms=50)
    assert link.wait_settled(1.0)
    w.fw.sync()
    assert [s.on for s in w.switches(1)] == [True]
    link.heartbeats_enabled = False
    time.sleep(0.1)  # the last heartbeat lands; MCU time stands still meanwhile
    w.fw.sync()
    w.time_us += 21_000  # silent for 21 ms of MCU time, 29 ms before the pulse would end
    w.fw.set_world(w.count, w.time_us)
    on, off = w.switches(1)
    assert on.on and not off.on
    assert off.mcu_time_us - on.mcu_time_us == 21_000
    deadline = time.monotonic() + 1.0
    while not any(isinstance(e, FaultEvent) and e.code == FaultCode.WATCHDOG for e in link.poll_events()):
        assert time.monotonic() < deadline, "no watchdog Fault"
        time.sleep(0.005)


def test_estop_switches_an_open_valve_off_at_once(world) -> None:
    w, link = world
    link.fire_now(30, 1, pulse_ms=50)
    assert link.wait_settled(1.0)
    w.fw.sync()
    w.fw.set_estop(True)
    sw = w.switches(1)
    assert [s.on for s in sw] == [True, False]
    assert sw[1].mcu_time_us == sw[0].mcu_time_us  # no MCU time passed: off immediately


def test_control_channel_reports_bad_lines(c_core_binary) -> None:
    with NativeFirmware(c_core_binary) as fw:
        with pytest.raises(NativeFirmwareError, match="unknown control line"):
            fw.command("frobnicate")
        assert fw.state()["configured"] == 0
    with NativeFirmware(c_core_binary, counts_per_s=1000.0) as fw:
        with pytest.raises(NativeFirmwareError, match="manual world"):
            fw.set_world(1, 1)


def test_serves_a_pty_master_passed_by_fd(c_core_binary) -> None:
    """``--fd N``: the firmware serves a pty someone else created (e.g. a supervisor that owns the port)."""
    import subprocess

    from firmware_bridge.pseudo_terminal import close_pty_pair, open_pty_pair

    master_fd, slave_path = open_pty_pair()
    proc = subprocess.Popen(
        [str(c_core_binary), "--fd", str(master_fd), "--speed", "1000"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(master_fd,),
    )
    try:
        with DiverterLink(slave_path) as link:
            link.configure(0.5, DIVERTERS)
            assert link.hello is not None and link.hello.protocol_version == 3
            time.sleep(0.2)
            assert link.belt_clock.counts_per_s == pytest.approx(1000.0, rel=0.05)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.terminate()
        proc.wait(2.0)
        close_pty_pair(master_fd)
