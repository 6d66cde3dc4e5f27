"""The host link against the firmware simulator over a real pseudo-terminal: the whole protocol, end to end.

Most tests drive a ManualEnvironment (conftest.py: clock and encoder move only when the test advances
them, 1000 counts/s), so what fires, and at which count, is deterministic. Only the wall-time watchdog and
BeltClock tests use real time, with generous slack. Diverter 0 has 20 ms latency = 20 counts.
"""

from __future__ import annotations

import time

import pytest

from firmware_bridge import (
    AckEvent,
    CommandTimeoutEvent,
    ConstantSpeedEnvironment,
    DiverterLink,
    DiverterSetup,
    FaultCode,
    FaultEvent,
    FiredEvent,
    FirmwareSimulator,
    LinkError,
    NakEvent,
    NakReason,
    ResetEvent,
)
from firmware_bridge.messages import MsgType


def nak_for(cid: int, reason: NakReason):
    return lambda e: isinstance(e, NakEvent) and e.command_id == cid and e.reason == reason


def test_handshake_and_configure(sim_link) -> None:
    sim, link, log = sim_link
    assert link.hello is not None and link.hello.boot_id == sim.boot_id
    assert not sim.configured
    link.configure(0.5, [DiverterSetup(0, 1000, 100)])
    assert sim.configured
    assert sim.config is not None and sim.config.diverters == (DiverterSetup(0, 1000, 100),)
    log.wait_for(lambda e: isinstance(e, AckEvent) and e.msg_type == MsgType.CONFIGURE)


def test_fire_at_before_configure_is_naked(sim_link, manual_env) -> None:
    sim, link, log = sim_link
    link.fire_at(1, 0, 1000, 10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(1, NakReason.NOT_CONFIGURED))


def test_future_fire_fires_once_at_latency_compensated_count(configured, manual_env) -> None:
    sim, link, log = configured
    assert manual_env.count == 20
    link.fire_at(7, 0, belt_count=100, pulse_ms=30)  # 20 ms latency at 1000 counts/s -> on at 80
    assert link.wait_settled(1.0)
    log.wait_for(lambda e: isinstance(e, AckEvent) and e.command_id == 7)

    manual_env.advance(59)  # count 79: one short
    assert sim.sync()
    assert manual_env.hits == []

    manual_env.advance(6)  # count 85: due; the output must switch exactly at 80, not at 85
    assert sim.sync()
    assert [(h.diverter, h.on_count, h.pulse_ms, h.command_id) for h in manual_env.hits] == [(0, 80, 30.0, 7)]
    fired = log.wait_for(lambda e: isinstance(e, FiredEvent))
    assert (fired.command_id, fired.diverter, fired.actual_count) == (7, 0, 80)

    manual_env.advance(100)
    assert sim.sync() and sim.sync()
    assert len(manual_env.hits) == 1
    assert len(log.of_type(FiredEvent)) == 1


def test_zero_latency_diverter_fires_at_commanded_count(configured, manual_env) -> None:
    sim, link, log = configured
    link.fire_at(8, 1, belt_count=50, pulse_ms=20)
    assert link.wait_settled(1.0)
    manual_env.advance(40)
    assert sim.sync()
    assert [h.on_count for h in manual_env.hits] == [50]


def test_late_command_is_naked_and_never_fired(configured, manual_env) -> None:
    sim, link, log = configured
    link.fire_at(3, 0, belt_count=40, pulse_ms=30)  # on_count 20 == current count: already late
    link.fire_at(4, 1, belt_count=5, pulse_ms=30)  # long past
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(3, NakReason.LATE))
    log.wait_for(nak_for(4, NakReason.LATE))
    manual_env.advance(100)
    assert sim.sync()
    assert manual_env.hits == []
    assert link.health()["naks"] == {"LATE": 2}


def test_duplicate_command_id_fires_once(configured, manual_env) -> None:
    sim, link, log = configured
    link.fire_at(5, 0, belt_count=200, pulse_ms=30)
    assert link.wait_settled(1.0)
    link.fire_at(5, 0, belt_count=200, pulse_ms=30)  # e.g. a host retry after a lost ack
    assert link.wait_settled(1.0)
    assert len([e for e in log.of_type(AckEvent) if e.command_id == 5]) == 2  # acked again...
    assert sim.queue_depth == 1  # ...but queued once
    manual_env.advance(300)
    assert sim.sync()
    assert [h.command_id for h in manual_env.hits] == [5]


def test_lost_frame_is_retransmitted_and_fires_once(configured, manual_env) -> None:
    sim, link, log = configured
    sim.drop_rx(MsgType.FIRE_AT, 1)
    assert sim.sync()
    link.fire_at(9, 0, belt_count=200, pulse_ms=30)
    assert link.wait_settled(1.0)
    log.wait_for(lambda e: isinstance(e, AckEvent) and e.command_id == 9)
    assert link.health()["retries"] >= 1
    manual_env.advance(300)
    assert sim.sync()
    assert [h.command_id for h in manual_env.hits] == [9]


def test_unanswered_command_times_out(configured) -> None:
    sim, link, log = configured
    sim.drop_rx(MsgType.FIRE_AT, 10)
    assert sim.sync()
    link.fire_at(10, 0, belt_count=500, pulse_ms=30)
    assert link.wait_settled(2.0)
    ev = log.wait_for(lambda e: isinstance(e, CommandTimeoutEvent))
    assert (ev.command_id, ev.attempts) == (10, 4)
    assert link.health()["timeouts"] == 1


def test_parameter_checks(configured) -> None:
    sim, link, log = configured
    link.fire_at(20, 0, 1000, pulse_ms=101)  # max_on_ms is 100
    link.fire_at(21, 9, 1000, pulse_ms=10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(20, NakReason.BAD_PARAMS))
    log.wait_for(nak_for(21, NakReason.UNKNOWN_DIVERTER))
    with pytest.raises(ValueError, match="pulse_ms"):
        link.fire_at(22, 0, 1000, pulse_ms=0)


def test_queue_limit(configured) -> None:
    sim, link, log = configured
    for cid in range(100, 165):
        link.fire_at(cid, 1, 10_000 + cid, 10)
    assert link.wait_settled(2.0)
    log.wait_for(nak_for(164, NakReason.QUEUE_FULL))
    assert sim.queue_depth == 64
    assert len([e for e in log.of_type(AckEvent) if e.msg_type == MsgType.FIRE_AT]) == 64


def test_cancel(configured, manual_env) -> None:
    sim, link, log = configured
    link.fire_at(30, 0, 300, 10)
    assert link.wait_settled(1.0)
    link.cancel(30)
    log.wait_for(lambda e: isinstance(e, AckEvent) and e.command_id == 30 and e.msg_type == MsgType.CANCEL)
    link.cancel(30)
    log.wait_for(nak_for(30, NakReason.NOT_QUEUED))
    manual_env.advance(400)
    assert sim.sync()
    assert manual_env.hits == []


def test_fire_now(configured, manual_env) -> None:
    sim, link, log = configured
    link.fire_now(40, 1, 25)
    assert link.wait_settled(1.0)
    fired = log.wait_for(lambda e: isinstance(e, FiredEvent))
    assert fired.actual_count == manual_env.count
    assert [(h.diverter, h.on_count, h.pulse_ms) for h in manual_env.hits] == [(1, manual_env.count, 25.0)]


def test_estop_cancels_queue_and_refuses_fires(configured, manual_env) -> None:
    sim, link, log = configured
    link.fire_at(50, 0, 500, 10)
    assert link.wait_settled(1.0)
    sim.set_estop(True)
    log.wait_for(lambda e: isinstance(e, FaultEvent) and e.code == FaultCode.ESTOP and e.detail == 1)
    log.wait_for(nak_for(50, NakReason.ESTOP))
    link.fire_at(51, 0, 600, 10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(51, NakReason.ESTOP))
    manual_env.advance(1000)
    assert sim.sync()
    assert manual_env.hits == []


def test_watchdog_on_mcu_clock_is_exact(configured, manual_env) -> None:
    sim, link, log = configured
    link.configure(0.5, [DiverterSetup(0, 20_000, 100)], watchdog_ms=250)
    link.fire_at(60, 0, 10_000, 10)
    assert link.wait_settled(1.0)
    link.heartbeats_enabled = False
    time.sleep(0.1)  # let a heartbeat already on the wire arrive
    assert sim.sync()
    manual_env.advance(0, dt_us=250_000)  # silent for exactly watchdog_ms: not yet
    assert sim.sync()
    assert not log.of_type(FaultEvent) and sim.queue_depth == 1
    manual_env.advance(0, dt_us=1_000)
    assert sim.sync()
    fault = log.wait_for(lambda e: isinstance(e, FaultEvent))
    assert (fault.code, fault.detail) == (FaultCode.WATCHDOG, 1)
    log.wait_for(nak_for(60, NakReason.WATCHDOG))
    assert sim.queue_depth == 0

    link.fire_at(61, 0, 10_000, 10)  # tripped: refused until a heartbeat re-arms
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(61, NakReason.WATCHDOG))

    link.heartbeats_enabled = True
    deadline = time.monotonic() + 1.0
    while link.mcu_status is None or link.mcu_status.watchdog_tripped:
        assert time.monotonic() < deadline, "watchdog not re-armed by heartbeats"
        time.sleep(0.005)
    link.fire_at(62, 0, 10_000, 10)
    assert link.wait_settled(1.0)
    log.wait_for(lambda e: isinstance(e, AckEvent) and e.command_id == 62)
    assert manual_env.hits == []


def test_watchdog_in_real_time_when_host_goes_silent() -> None:
    env = ConstantSpeedEnvironment(mm_per_count=0.5, speed_mm_s=500.0)
    with FirmwareSimulator.on_new_pty(env) as sim, DiverterLink(sim.slave_path) as link:
        link.configure(0.5, [DiverterSetup(0, 5_000, 100)], watchdog_ms=250)
        link.fire_at(1, 0, env.encoder_count() + 100_000, 10)
        assert link.wait_settled(1.0)
        link.heartbeats_enabled = False
        silent_since = time.monotonic()
        deadline = silent_since + 2.0
        events = []
        while not any(isinstance(e, FaultEvent) for e in events):
            assert time.monotonic() < deadline, f"no watchdog fault; events {events}"
            time.sleep(0.002)
            events += link.poll_events()
        fault = next(e for e in events if isinstance(e, FaultEvent))
        assert fault.code == FaultCode.WATCHDOG and fault.detail == 1
        # The last heartbeat left at most one heartbeat interval before silence began.
        assert 0.25 - 0.06 <= fault.host_time_s - silent_since <= 0.25 + 0.35
        assert any(isinstance(e, NakEvent) and e.reason == NakReason.WATCHDOG for e in events)
        assert list(env.actuations) == []


def test_mcu_reset_is_detected_and_configuration_restored(configured, manual_env) -> None:
    sim, link, log = configured
    link.fire_at(70, 0, 500, 10)
    assert link.wait_settled(1.0)
    old_boot = sim.boot_id
    sim.reset()
    ev = log.wait_for(lambda e: isinstance(e, ResetEvent))
    assert ev.boot_id == sim.boot_id != old_boot
    assert ev.lost_command_ids == (70,) and ev.reconfigure_sent
    deadline = time.monotonic() + 1.0
    while not sim.configured:
        assert time.monotonic() < deadline, "link did not re-send Configure after the reset"
        time.sleep(0.005)
    assert link.health()["resets"] == 1
    manual_env.advance(10)
    assert sim.sync()
    manual_env.advance(10)
    assert sim.sync()
    link.fire_at(71, 1, manual_env.count + 50, 10)
    assert link.wait_settled(1.0)
    manual_env.advance(60)
    assert sim.sync()
    assert [h.command_id for h in manual_env.hits] == [71]


def test_belt_clock_tracks_a_constant_speed_belt() -> None:
    env = ConstantSpeedEnvironment(mm_per_count=0.5, speed_mm_s=500.0)  # 1000 counts/s
    with FirmwareSimulator.on_new_pty(env) as sim, DiverterLink(sim.slave_path) as link:
        link.configure(0.5, [DiverterSetup(0, 0, 100)], report_interval_ms=10)
        time.sleep(0.6)
        now = time.monotonic()
        error_counts = link.belt_clock.count_at(now) - env.count_at(now)
        assert abs(error_counts) < 5.0  # < 5 ms of belt travel
        assert link.belt_clock.counts_per_s == pytest.approx(1000.0, rel=0.02)
        health = link.health()
        assert health["crc_errors"] == 0 and health["rtt_ms"] is not None


def test_open_without_mcu_says_what_to_check() -> None:
    link = DiverterLink("loop://")
    with pytest.raises(LinkError, match="no Hello from the diverter MCU"):
        link.open(timeout=0.3)


def test_open_bad_port_says_what_to_check() -> None:
    with pytest.raises(LinkError, match="check the port name|Check the port name"):
        DiverterLink("/dev/does-not-exist-kozan").open(timeout=0.3)


def test_configure_is_validated_on_the_host(sim_link) -> None:
    sim, link, log = sim_link
    with pytest.raises(ValueError, match="mm_per_count"):
        link.configure(0.0, [DiverterSetup(0, 0, 10)])
    with pytest.raises(ValueError, match="unique"):
        link.configure(0.5, [DiverterSetup(0, 0, 10), DiverterSetup(0, 0, 10)])


def test_without_reconnect_the_link_stays_down_until_reopen(manual_env) -> None:
    """``reconnect=False`` keeps the old contract: the station is told, and the link waits for reopen()."""
    from firmware_bridge import LinkErrorEvent

    from .conftest import EventLog

    sim = FirmwareSimulator.on_new_pty(manual_env)
    sim.start()
    assert sim.slave_path is not None
    link = DiverterLink(sim.slave_path, reconnect=False)
    try:
        link.open(timeout=2.0)
        log = EventLog(link)
        new_path = sim.replug()
        lost = log.wait_for(lambda e: isinstance(e, LinkErrorEvent))
        assert not lost.reconnecting and lost.in_doubt_command_ids == ()
        deadline = time.monotonic() + 1.0
        while link._thread is not None and link._thread.is_alive():
            assert time.monotonic() < deadline, "the I/O thread kept running without reconnect"
            time.sleep(0.01)
        with pytest.raises(LinkError, match="close\\(\\) and open\\(\\)"):
            link.fire_at(1, 0, 100, 10)
        link.url = new_path
        assert link.reopen(timeout=2.0).boot_id == sim.boot_id
        h = link.health()
        assert (h["connected"], h["disconnects"], h["reconnects"]) == (True, 1, 0)
    finally:
        link.close()
        sim.stop()
