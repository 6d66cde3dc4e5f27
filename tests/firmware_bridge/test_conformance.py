"""One conformance suite, two MCUs: the Python simulator and the C firmware core (host build).

Each test body runs against both implementations (the ``mcu`` fixture, conftest.py), each on the far end
of its own real pseudo-terminal and driven through the real host ``DiverterLink``. The world is manual:
the belt and the MCU clock move only when a test advances them (1000 counts/s), so what fires, and at
which count, is deterministic. If a test passes for one implementation and fails for the other, the C
firmware and the reference behaviour (simulator.py, PROTOCOL.md) disagree: that is the point of it.
"""

from __future__ import annotations

import os
import time
import zlib

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
    LinkErrorEvent,
    LinkRestoredEvent,
    NakEvent,
    NakReason,
    ResetEvent,
)
from firmware_bridge.framing import Frame, encode_frame
from firmware_bridge.messages import Configure, FireAt, Identify, MsgType
from firmware_bridge.native import NativeFirmware

from .conftest import EventLog

MCU_KINDS = ["python-sim", "c-core"]  # the same two as the `mcu` fixture in conftest.py
DIVERTERS = [
    DiverterSetup(id=0, latency_us=20_000, max_on_ms=100),  # 20 ms ahead = 20 counts at 1000 counts/s
    DiverterSetup(id=1, latency_us=0, max_on_ms=50),
]


def nak_for(cid: int, reason: NakReason):
    return lambda e: isinstance(e, NakEvent) and e.command_id == cid and e.reason == reason


def ack_for(cid: int, msg_type: int = MsgType.FIRE_AT):
    return lambda e: isinstance(e, AckEvent) and e.command_id == cid and e.msg_type == msg_type


def wait_until(predicate, timeout: float = 1.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# ------------------------------------------------------------------------------------------- handshake
def test_handshake_and_configure(linked) -> None:
    mcu, link, log = linked
    assert link.hello is not None and link.hello.boot_id == mcu.boot_id
    assert link.hello.protocol_version == 3 and link.hello.config_crc == 0
    assert not mcu.configured
    link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
    assert mcu.configured
    log.wait_for(ack_for(0, MsgType.CONFIGURE))
    # The config CRC in Hello is CRC-32 of the accepted Configure payload: it reveals a reset MCU.
    link._send(Identify())
    expected = zlib.crc32(Configure(0.5, tuple(DIVERTERS), 60_000, 20).encode_payload())
    wait_until(lambda: link.hello is not None and link.hello.config_crc == expected, what="Hello with config CRC")
    assert link.health()["resets"] == 0


def test_fire_before_configure_is_naked(linked) -> None:
    mcu, link, log = linked
    link.fire_at(1, 0, 1000, 10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(1, NakReason.NOT_CONFIGURED))


def test_invalid_configure_is_refused_by_the_mcu(linked) -> None:
    mcu, link, log = linked
    link._send(Configure(0.5, (DiverterSetup(0, 0, 10),), watchdog_ms=10))  # host would refuse it
    ev = log.wait_for(lambda e: isinstance(e, NakEvent) and e.msg_type == MsgType.CONFIGURE)
    assert ev.reason == NakReason.BAD_PARAMS
    assert not mcu.configured


# ------------------------------------------------------------------------------------------- firing
def test_future_fire_fires_once_at_latency_compensated_count(ready) -> None:
    mcu, link, log = ready
    link.fire_at(7, 0, belt_count=100, pulse_ms=30)  # 20 ms latency at 1000 counts/s -> on at 80
    assert link.wait_settled(1.0)
    log.wait_for(ack_for(7))
    mcu.advance(59)  # count 79: one short
    assert mcu.shots() == []
    mcu.advance(6)  # count 85: due; the command's on_count is 80, not 85
    assert [(s.diverter, s.on_count, s.pulse_ms, s.command_id) for s in mcu.shots()] == [(0, 80, 30, 7)]
    fired = log.wait_for(lambda e: isinstance(e, FiredEvent))
    assert (fired.command_id, fired.diverter, fired.actual_count) == (7, 0, 80)
    mcu.advance(100)
    mcu.sync()
    assert len(mcu.shots()) == 1
    assert len(log.of_type(FiredEvent)) == 1


def test_zero_latency_diverter_fires_at_commanded_count(ready) -> None:
    mcu, link, log = ready
    link.fire_at(8, 1, belt_count=50, pulse_ms=20)
    assert link.wait_settled(1.0)
    mcu.advance(29)
    assert mcu.shots() == []
    mcu.advance(1)
    assert [(s.on_count, s.count_when_called) for s in mcu.shots()] == [(50, 50)]


def test_compensation_follows_measured_speed(ready) -> None:
    mcu, link, log = ready
    for _ in range(12):  # belt now at 2000 counts/s over the whole 100 ms window
        mcu.advance(20, dt_us=10_000)
    assert mcu.counts_per_s == pytest.approx(2000.0)
    start = mcu.count
    link.fire_at(9, 0, belt_count=start + 200, pulse_ms=10)  # 20 ms at 2000 counts/s = 40 counts
    assert link.wait_settled(1.0)
    mcu.advance(200, dt_us=100_000)
    assert [s.on_count for s in mcu.shots()] == [start + 160]


def test_late_command_is_naked_and_never_fired(ready) -> None:
    mcu, link, log = ready
    link.fire_at(3, 0, belt_count=40, pulse_ms=30)  # on_count 20 == current count: already late
    link.fire_at(4, 1, belt_count=5, pulse_ms=30)  # long past
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(3, NakReason.LATE))
    log.wait_for(nak_for(4, NakReason.LATE))
    mcu.advance(100)
    assert mcu.shots() == []
    assert link.health()["naks"] == {"LATE": 2}


def test_duplicate_command_id_fires_once(ready) -> None:
    mcu, link, log = ready
    link.fire_at(5, 0, belt_count=200, pulse_ms=30)
    assert link.wait_settled(1.0)
    link.fire_at(5, 0, belt_count=200, pulse_ms=30)  # e.g. a host retry after a lost ack
    assert link.wait_settled(1.0)
    assert len([e for e in log.of_type(AckEvent) if e.command_id == 5]) == 2  # acked again...
    assert mcu.queue_depth == 1  # ...but queued once
    mcu.advance(300)
    assert [s.command_id for s in mcu.shots()] == [5]
    link.fire_at(5, 0, belt_count=900, pulse_ms=30)  # after firing: same answer, never queued again
    assert link.wait_settled(1.0)
    assert mcu.queue_depth == 0
    mcu.advance(1000)
    assert [s.command_id for s in mcu.shots()] == [5]


def test_duplicate_of_a_naked_command_gets_the_same_nak(ready) -> None:
    mcu, link, log = ready
    link.fire_at(6, 9, belt_count=500, pulse_ms=10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(6, NakReason.UNKNOWN_DIVERTER))
    link.fire_at(6, 0, belt_count=500, pulse_ms=10)  # same id, now valid: still the first answer
    assert link.wait_settled(1.0)  # answered (a Nak), not timed out and not acked...
    assert not [e for e in log.of_type(AckEvent) if e.command_id == 6]
    assert not log.of_type(CommandTimeoutEvent)
    # ...and the station is told a command's final outcome once (PROTOCOL.md §7)
    assert len([e for e in log.of_type(NakEvent) if e.command_id == 6]) == 1
    mcu.advance(600)
    assert mcu.shots() == []


def test_lost_frame_is_retransmitted_and_fires_once(ready) -> None:
    mcu, link, log = ready
    mcu.drop_rx(MsgType.FIRE_AT, 1)
    link.fire_at(9, 0, belt_count=200, pulse_ms=30)
    assert link.wait_settled(1.0)
    log.wait_for(ack_for(9))
    assert link.health()["retries"] >= 1
    mcu.advance(300)
    assert [s.command_id for s in mcu.shots()] == [9]


def test_unanswered_command_times_out(ready) -> None:
    mcu, link, log = ready
    mcu.drop_rx(MsgType.FIRE_AT, 1000)
    link.fire_at(10, 0, belt_count=500, pulse_ms=30)
    assert link.wait_settled(2.0)
    ev = log.wait_for(lambda e: isinstance(e, CommandTimeoutEvent))
    assert (ev.command_id, ev.attempts) == (10, 4)
    assert not link.wait_resolved(0.1) and link.health()["unresolved"] == 1  # still being asked
    mcu.advance(600)
    assert mcu.shots() == []


def test_queue_full(ready) -> None:
    mcu, link, log = ready
    for cid in range(100, 165):
        link.fire_at(cid, 1, 10_000 + cid, 10)
    assert link.wait_settled(2.0)
    log.wait_for(nak_for(164, NakReason.QUEUE_FULL))
    assert mcu.queue_depth == 64
    assert len([e for e in log.of_type(AckEvent) if e.msg_type == MsgType.FIRE_AT]) == 64


def test_bad_params(ready) -> None:
    mcu, link, log = ready
    link.fire_at(20, 0, 1000, pulse_ms=101)  # diverter 0: max_on_ms 100
    link._submit(FireAt(21, 1, 1000, 0))  # pulse 0 (the host refuses it; the MCU must too)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(20, NakReason.BAD_PARAMS))
    log.wait_for(nak_for(21, NakReason.BAD_PARAMS))
    mcu.advance(2000)
    assert mcu.shots() == []


def test_unknown_diverter(ready) -> None:
    mcu, link, log = ready
    link.fire_at(22, 9, 1000, pulse_ms=10)
    link.fire_now(23, 9, pulse_ms=10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(22, NakReason.UNKNOWN_DIVERTER))
    log.wait_for(nak_for(23, NakReason.UNKNOWN_DIVERTER))
    mcu.advance(2000)
    assert mcu.shots() == []


def test_unknown_message_type_and_bad_payload_and_bad_version(ready) -> None:
    mcu, link, log = ready
    link._ser.write(encode_frame(Frame(3, 200, 0x0F, b"")))  # no such message
    ev = log.wait_for(lambda e: isinstance(e, NakEvent) and e.msg_type == 0x0F)
    assert ev.reason == NakReason.UNSUPPORTED
    link._ser.write(encode_frame(Frame(3, 201, int(MsgType.CANCEL), b"\x01\x02")))  # 2 bytes, needs 4
    ev = log.wait_for(lambda e: isinstance(e, NakEvent) and e.msg_type == MsgType.CANCEL)
    assert ev.reason == NakReason.BAD_PARAMS
    link._ser.write(encode_frame(Frame(2, 202, int(MsgType.HEARTBEAT), bytes(12))))  # protocol v2
    fault = log.wait_for(lambda e: isinstance(e, FaultEvent))
    assert (fault.code, fault.detail) == (FaultCode.BAD_VERSION, 2)


def test_cancel(ready) -> None:
    mcu, link, log = ready
    link.fire_at(30, 0, 300, 10)
    assert link.wait_settled(1.0)
    link.cancel(30)
    log.wait_for(ack_for(30, MsgType.CANCEL))
    assert mcu.queue_depth == 0
    link.cancel(30)
    log.wait_for(nak_for(30, NakReason.NOT_QUEUED))
    link.cancel(12345)
    log.wait_for(nak_for(12345, NakReason.NOT_QUEUED))
    mcu.advance(400)
    assert mcu.shots() == []


def test_fire_now(ready) -> None:
    mcu, link, log = ready
    link.fire_now(40, 1, 25)
    assert link.wait_settled(1.0)
    fired = log.wait_for(lambda e: isinstance(e, FiredEvent))
    assert (fired.command_id, fired.actual_count) == (40, mcu.count)
    assert [(s.diverter, s.on_count, s.pulse_ms) for s in mcu.shots()] == [(1, mcu.count, 25)]
    link.fire_now(40, 1, 25)  # a retransmission never fires twice
    assert link.wait_settled(1.0)
    mcu.sync()
    assert len(mcu.shots()) == 1


def test_new_configuration_ends_queued_commands(ready) -> None:
    mcu, link, log = ready
    link.fire_at(45, 0, 500, 10)
    assert link.wait_settled(1.0)
    link.configure(0.5, DIVERTERS, watchdog_ms=60_000)  # identical: harmless, queue kept
    assert mcu.queue_depth == 1
    link.configure(0.25, DIVERTERS, watchdog_ms=60_000)  # different: queue ends with NOT_CONFIGURED
    log.wait_for(nak_for(45, NakReason.NOT_CONFIGURED))
    assert mcu.queue_depth == 0
    mcu.advance(600)
    assert mcu.shots() == []


# ------------------------------------------------------------------------------------------- events (v2)
def test_fired_is_resent_until_acked_and_told_once(ready) -> None:
    """PROTOCOL.md §6a: the MCU re-sends an event until the host's EventAck arrives; the host acks every
    copy and tells the station once."""
    mcu, link, log = ready
    mcu.drop_rx(MsgType.EVENT_ACK, 2)  # the host's first two acks are lost
    link.fire_at(11, 1, belt_count=40, pulse_ms=10)
    assert link.wait_settled(1.0)
    mcu.advance(20)  # count 40: fires
    log.wait_for(lambda e: isinstance(e, FiredEvent) and e.command_id == 11)
    for _ in range(2):  # re-sent after 50 ms, then 100 ms of MCU time
        time.sleep(0.05)  # the host's (dropped) ack reaches the MCU first
        mcu.advance(100)
    wait_until(lambda: link.health()["event_dups"] >= 2, what="two re-sent copies of Fired")
    wait_until(lambda: mcu.events_pending == 0, what="the third ack to clear the MCU's event buffer")
    dups = link.health()["event_dups"]
    mcu.advance(1000)
    time.sleep(0.05)
    mcu.sync()
    assert link.health()["event_dups"] == dups, "re-sent after it was acked"
    assert len([e for e in log.of_type(FiredEvent) if e.command_id == 11]) == 1
    assert [s.command_id for s in mcu.shots()] == [11]


def test_cancel_is_one_outcome(ready) -> None:
    """The Cancel's Ack and the Ended(CANCELLED) event are one outcome: told once."""
    mcu, link, log = ready
    link.fire_at(12, 0, 500, 10)
    assert link.wait_settled(1.0)
    link.cancel(12)
    log.wait_for(ack_for(12, MsgType.CANCEL))
    wait_until(lambda: mcu.events_pending == 0, what="Ended(CANCELLED) acked")
    assert link.wait_resolved(1.0)
    assert len([e for e in log.of_type(AckEvent) if e.command_id == 12 and e.msg_type == MsgType.CANCEL]) == 1
    mcu.advance(600)
    assert mcu.shots() == []


def test_timed_out_command_is_resolved_later(ready) -> None:
    """A command whose copies are all lost is reported timed out, then re-sent until the MCU answers it:
    its final outcome is always learnt (here: accepted and fired at its count)."""
    mcu, link, log = ready
    mcu.drop_rx(MsgType.FIRE_AT, 5)  # the first send and 3 retries, and one resolving re-send
    link.fire_at(13, 1, belt_count=2000, pulse_ms=10)
    assert link.wait_settled(2.0)
    log.wait_for(lambda e: isinstance(e, CommandTimeoutEvent) and e.command_id == 13)
    log.wait_for(ack_for(13), timeout=2.0)
    assert link.health()["resolved_after_timeout"] == 1
    mcu.advance(2000)
    log.wait_for(lambda e: isinstance(e, FiredEvent) and e.command_id == 13)
    assert link.wait_resolved(1.0)
    assert [(s.command_id, s.on_count) for s in mcu.shots()] == [(13, 2000)]


def test_timed_out_command_past_its_count_is_naked_late(ready) -> None:
    mcu, link, log = ready
    mcu.drop_rx(MsgType.FIRE_AT, 5)  # 4 copies, and the first re-send at the timeout itself
    link.fire_at(14, 1, belt_count=60, pulse_ms=10)
    assert link.wait_settled(2.0)
    log.wait_for(lambda e: isinstance(e, CommandTimeoutEvent) and e.command_id == 14)
    mcu.advance(100)  # the belt passes count 60 before the MCU ever sees the command
    log.wait_for(nak_for(14, NakReason.LATE), timeout=2.0)
    assert link.wait_resolved(1.0)
    mcu.advance(100)
    assert mcu.shots() == []


# ------------------------------------------------------------------------------------------- safety
def test_watchdog_trip_and_rearm(ready) -> None:
    mcu, link, log = ready
    link.configure(0.5, DIVERTERS, watchdog_ms=250)
    link.fire_at(60, 0, 10_000, 10)
    assert link.wait_settled(1.0)
    link.heartbeats_enabled = False
    time.sleep(0.1)  # let a heartbeat already on the wire arrive
    mcu.sync()
    mcu.advance(0, dt_us=250_000)  # silent for exactly watchdog_ms of MCU time: not yet
    assert not log.of_type(FaultEvent) and mcu.queue_depth == 1
    mcu.advance(0, dt_us=1_000)
    fault = log.wait_for(lambda e: isinstance(e, FaultEvent))
    assert (fault.code, fault.detail) == (FaultCode.WATCHDOG, 1)
    log.wait_for(nak_for(60, NakReason.WATCHDOG))
    assert mcu.queue_depth == 0
    wait_until(lambda: link.mcu_status is not None and link.mcu_status.watchdog_tripped, what="tripped Status")

    link.fire_at(61, 0, 10_000, 10)  # tripped: refused until a heartbeat re-arms
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(61, NakReason.WATCHDOG))

    link.heartbeats_enabled = True
    wait_until(lambda: not link.mcu_status.watchdog_tripped, what="re-armed Status")
    link.fire_at(62, 0, 10_000, 10)
    assert link.wait_settled(1.0)
    log.wait_for(ack_for(62))
    mcu.advance(20_000, dt_us=1_000)  # command 60 was cancelled and never fires; 62 does
    assert [s.command_id for s in mcu.shots()] == [62]


def test_estop_flushes_queue_refuses_fires_and_needs_an_explicit_rearm(ready) -> None:
    """PROTOCOL.md §6: releasing the e-stop does not re-enable firing; only the host's Arm(1) does."""
    mcu, link, log = ready
    link.fire_at(50, 0, 500, 10)
    link.fire_at(51, 1, 600, 10)
    assert link.wait_settled(1.0)
    mcu.set_estop(True)
    fault = log.wait_for(lambda e: isinstance(e, FaultEvent) and e.code == FaultCode.ESTOP)
    assert fault.detail == 2
    log.wait_for(nak_for(50, NakReason.ESTOP))
    log.wait_for(nak_for(51, NakReason.ESTOP))
    assert link.estop_latched
    link.fire_at(52, 0, 700, 10)
    link.fire_now(53, 0, 10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(52, NakReason.ESTOP))
    log.wait_for(nak_for(53, NakReason.ESTOP))
    with pytest.raises(LinkError, match="still pressed"):
        link.rearm()  # nothing can be re-armed while the input is pressed
    mcu.advance(1000)
    assert mcu.shots() == []
    # Released: still refused (NOT_ARMED), and nothing from before fires by itself.
    mcu.set_estop(False)
    wait_until(lambda: link.mcu_status is not None and not link.mcu_status.estop, what="estop released Status")
    assert not link.mcu_status.armed and not mcu.armed and link.estop_latched
    link.fire_at(54, 1, mcu.count + 50, 10)
    link.fire_now(55, 1, 10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(54, NakReason.NOT_ARMED))
    log.wait_for(nak_for(55, NakReason.NOT_ARMED))
    mcu.advance(1000)
    assert mcu.shots() == []
    # The explicit re-arm (the operator's reset on the station):
    link.rearm()
    assert mcu.armed and not link.estop_latched
    wait_until(lambda: link.mcu_status.armed, what="armed Status")
    link.fire_at(56, 1, mcu.count + 50, 10)
    assert link.wait_settled(1.0)
    log.wait_for(ack_for(56))
    mcu.advance(100)
    assert [s.command_id for s in mcu.shots()] == [56]


def test_host_disarm_is_a_software_estop(ready) -> None:
    mcu, link, log = ready
    link.fire_at(57, 1, mcu.count + 500, 10)
    assert link.wait_settled(1.0)
    link.disarm()
    log.wait_for(nak_for(57, NakReason.NOT_ARMED))  # Ended(NOT_ARMED): the queue is flushed
    assert mcu.queue_depth == 0 and not mcu.armed and link.estop_latched
    link.fire_now(58, 1, 10)
    assert link.wait_settled(1.0)
    log.wait_for(nak_for(58, NakReason.NOT_ARMED))
    link.rearm()
    link.fire_now(59, 1, 10)
    log.wait_for(lambda e: isinstance(e, FiredEvent) and e.command_id == 59)
    mcu.advance(1000)
    assert [s.command_id for s in mcu.shots()] == [59]


def test_arm_and_belt_run_take_only_0_or_1(ready) -> None:
    mcu, link, log = ready
    for msg_type in (MsgType.ARM, MsgType.BELT_RUN):
        link._ser.write(encode_frame(Frame(3, 210, int(msg_type), b"\x02")))
        ev = log.wait_for(lambda e, t=msg_type: isinstance(e, NakEvent) and e.msg_type == t)
        assert ev.reason == NakReason.BAD_PARAMS
    assert mcu.armed and not mcu.belt_running


# ------------------------------------------------------------------------------------------- belt run/stop
def test_belt_needs_a_configuration_to_run_but_always_stops(linked) -> None:
    mcu, link, log = linked
    with pytest.raises(LinkError, match="NOT_CONFIGURED"):
        link.belt_run(True)
    link.belt_run(False)  # stopping is the safe direction: always accepted
    assert not mcu.belt_running


def test_belt_run_stop_keeps_the_queue_and_estop_stops_it(ready) -> None:
    """PROTOCOL.md §5a: the belt-run output; commands stay queued across a stop (scheduled by position)."""
    mcu, link, log = ready
    assert not mcu.belt_running  # off at power-on
    link.belt_run(True)
    assert mcu.belt_running
    wait_until(lambda: link.mcu_status is not None and link.mcu_status.belt_running, what="belt running Status")
    log.wait_for(ack_for(0, MsgType.BELT_RUN))
    link.fire_at(80, 1, belt_count=mcu.count + 50, pulse_ms=10)
    assert link.wait_settled(1.0)
    link.belt_run(False)
    link.belt_run(False)  # idempotent
    assert not mcu.belt_running and mcu.queue_depth == 1
    mcu.advance(0, dt_us=500_000)  # the belt stands: nothing fires, nothing is dropped
    assert mcu.shots() == [] and mcu.queue_depth == 1
    link.belt_run(True)
    mcu.advance(60)
    assert [(s.command_id, s.on_count) for s in mcu.shots()] == [(80, 70)]
    # The e-stop stops the belt; it runs again only after the explicit re-arm.
    mcu.set_estop(True)
    assert not mcu.belt_running
    with pytest.raises(LinkError, match="ESTOP"):
        link.belt_run(True)
    mcu.set_estop(False)
    with pytest.raises(LinkError, match="NOT_ARMED"):
        link.belt_run(True)
    assert not mcu.belt_running
    link.rearm()
    link.belt_run(True)
    assert mcu.belt_running


# ------------------------------------------------------------------------------------------- reconnect
def _repoint(link_path, target: str) -> None:
    """Atomically point the stable port name (a udev-style symlink) at ``target``."""
    tmp = link_path.with_name(link_path.name + ".new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link_path)


def _configured_with_one_command_queued(link: DiverterLink, port, mcu) -> EventLog:
    """The link on the MCU's stable name (a symlink, as a udev rule gives), configured, command 1 acked."""
    _repoint(port, mcu.slave_path)
    link.open(timeout=2.0)
    log = EventLog(link)
    link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
    mcu.advance(10)
    mcu.advance(10)
    link.fire_at(1, 1, belt_count=mcu.count + 100, pulse_ms=10)
    assert link.wait_settled(1.0)
    return log


def test_port_lost_and_reopened_by_itself_mcu_ran_on(mcu, tmp_path) -> None:
    """PROTOCOL.md §7: the cable is pulled and plugged back (the MCU runs on, its port re-enumerates at the
    same stable name). The link re-opens the port with backoff, no reopen() call; the station is told of
    the loss (with the commands in doubt) and of the recovery; every command then gets its real outcome."""
    port = tmp_path / "ttyKOZAN"
    link = DiverterLink(str(port), reconnect_initial_s=0.05, reconnect_max_s=0.2)
    try:
        log = _configured_with_one_command_queued(link, port, mcu)
        boot = mcu.boot_id
        new_path = mcu.replug()  # the old pty closes: the host's reads fail
        lost = log.wait_for(lambda e: isinstance(e, LinkErrorEvent))
        assert lost.reconnecting and lost.in_doubt_command_ids == (1,)
        assert not link.connected
        link.fire_at(2, 1, belt_count=mcu.count + 150, pulse_ms=10)  # accepted while down, sent on reconnect
        wait_until(lambda: link.health()["reconnect_attempts"] >= 2, what="re-open attempts on the dead name")
        _repoint(port, new_path)  # the device comes back under its stable name
        restored = log.wait_for(lambda e: isinstance(e, LinkRestoredEvent), timeout=3.0)
        assert not restored.mcu_reset and restored.boot_id == boot == mcu.boot_id and restored.reconnects == 1
        log.wait_for(ack_for(2), timeout=2.0)
        mcu.advance(200)
        log.wait_for(lambda e: isinstance(e, FiredEvent) and e.command_id == 2)
        assert sorted(s.command_id for s in mcu.shots()) == [1, 2]
        assert link.wait_resolved(2.0)
        assert not log.of_type(ResetEvent)
        h = link.health()
        assert (h["connected"], h["reconnects"], h["disconnects"], h["resets"]) == (True, 1, 1, 0)
    finally:
        link.close()


def test_reopened_port_failing_again_is_one_outage(mcu, tmp_path) -> None:
    """A cable that comes and goes: the port is re-opened, then fails again before the MCU's Hello. Found
    by the fault campaign (two replugs 65 ms apart): the station was told "link lost" twice and "restored"
    once, the down time counted from the second loss. One outage is one LinkErrorEvent and one LinkRestoredEvent, its
    down time counted from the first loss."""
    import select

    port = tmp_path / "ttyKOZAN"
    link = DiverterLink(str(port), reconnect_initial_s=0.05, reconnect_max_s=0.2)
    flaky_master = flaky_slave = None
    try:
        log = _configured_with_one_command_queued(link, port, mcu)
        new_path = mcu.replug()
        first = log.wait_for(lambda e: isinstance(e, LinkErrorEvent))
        lost_at = time.monotonic()
        # the name comes back on a port with no MCU behind it (the flaky cable's brief contact) ...
        flaky_master, flaky_slave = os.openpty()
        _repoint(port, os.ttyname(flaky_slave))
        assert select.select([flaky_master], [], [], 3.0)[0], "the link never re-opened the port"
        assert os.read(flaky_master, 256)  # its Identify: the port is open and waiting for a Hello
        os.close(flaky_master)  # ... and goes again before any answer
        os.close(flaky_slave)
        flaky_master = flaky_slave = None
        wait_until(lambda: link.health()["disconnects"] == 2, timeout=2.0, what="the second loss")
        second_lost_at = time.monotonic()
        _repoint(port, new_path)  # then the MCU is there for good
        restored = log.wait_for(lambda e: isinstance(e, LinkRestoredEvent), timeout=3.0)
        log.drain()
        assert [e for e in log.events if isinstance(e, LinkErrorEvent)] == [first]
        assert [e for e in log.events if isinstance(e, LinkRestoredEvent)] == [restored]
        assert restored.down_s >= second_lost_at - lost_at and not restored.mcu_reset
        mcu.advance(200)  # and the command in doubt still gets its real outcome
        log.wait_for(lambda e: isinstance(e, FiredEvent) and e.command_id == 1)
        assert link.wait_resolved(2.0)
        h = link.health()
        assert (h["connected"], h["reconnects"], h["disconnects"]) == (True, 1, 2)
    finally:
        for fd in (flaky_master, flaky_slave):
            if fd is not None:
                os.close(fd)
        link.close()


def test_port_lost_and_mcu_restarted_is_reconfigured(mcu, tmp_path, request) -> None:
    """The MCU process restarts on a new pty at the same stable name: a new boot id. The link reports the
    queued command lost (ResetEvent), re-sends the configuration, then reports the recovery as a reset."""
    from .conftest import make_mcu

    port = tmp_path / "ttyKOZAN"
    link = DiverterLink(str(port), reconnect_initial_s=0.05, reconnect_max_s=0.2)
    second = None
    try:
        log = _configured_with_one_command_queued(link, port, mcu)
        mcu.stop()
        lost = log.wait_for(lambda e: isinstance(e, LinkErrorEvent))
        assert lost.in_doubt_command_ids == (1,)
        second = make_mcu(mcu.name, request)
        _repoint(port, second.slave_path)
        restored = log.wait_for(lambda e: isinstance(e, LinkRestoredEvent), timeout=3.0)
        assert restored.mcu_reset and restored.boot_id == second.boot_id
        reset = next(e for e in log.events if isinstance(e, ResetEvent))
        assert reset.lost_command_ids == (1,) and reset.reconfigure_sent
        wait_until(lambda: second.configured, what="the new boot reconfigured by itself")
        assert link.health()["reconnects"] == 1 and link.health()["resets"] == 1
    finally:
        link.close()
        if second is not None:
            second.stop()


def test_mcu_reset_is_detected_and_configuration_restored(ready) -> None:
    mcu, link, log = ready
    link.fire_at(70, 0, 500, 10)
    assert link.wait_settled(1.0)
    old_boot = mcu.boot_id
    mcu.reset()
    ev = log.wait_for(lambda e: isinstance(e, ResetEvent))
    assert ev.boot_id == mcu.boot_id != old_boot
    assert ev.lost_command_ids == (70,) and ev.reconfigure_sent
    wait_until(lambda: mcu.configured, what="re-Configure after the reset")
    assert link.health()["resets"] == 1
    mcu.advance(10)
    mcu.advance(10)
    link.fire_at(71, 1, mcu.count + 50, 10)
    assert link.wait_settled(1.0)
    mcu.advance(600)
    assert [s.command_id for s in mcu.shots()] == [71]  # 70 died with the old boot


# ------------------------------------------------------------------------------------------- real time
WATCHDOG_MS = 250


def _silent_host_trial(kind: str, request: pytest.FixtureRequest) -> bool:
    """One real-time trial; False if the host itself stalled past the watchdog before it went silent."""
    if kind == "python-sim":
        env = ConstantSpeedEnvironment(mm_per_count=0.5, speed_mm_s=500.0)
        served = FirmwareSimulator.on_new_pty(env)
    else:
        served = NativeFirmware(request.getfixturevalue("c_core_binary"), counts_per_s=1000.0)

    def mcu_trips() -> int:
        return served.stats["watchdog_trips"] if kind == "python-sim" else served.state()["watchdog_trips"]

    def mcu_frames_rx() -> int:
        return served.stats["frames_rx"] if kind == "python-sim" else served.state()["frames_rx"]

    with served:
        with DiverterLink(served.slave_path) as link:
            link.configure(0.5, [DiverterSetup(0, 5_000, 100)], watchdog_ms=WATCHDOG_MS)
            time.sleep(0.05)
            count_now = link.belt_clock.count_at(time.monotonic())
            link.fire_at(1, 0, int(count_now) + 100_000, 10)
            assert link.wait_settled(1.0)
            link.heartbeats_enabled = False
            if mcu_trips() != 0:  # a legitimate trip: this host (not the MCU) was starved >= 250 ms
                return False
            events = []
            deadline = time.monotonic() + 5.0  # liveness only; the timing is judged on the MCU's clock
            while not any(isinstance(e, FaultEvent) for e in events):
                assert time.monotonic() < deadline, f"no watchdog fault; events {events}"
                time.sleep(0.002)
                events += link.poll_events()
            fault = next(e for e in events if isinstance(e, FaultEvent))
            assert fault.code == FaultCode.WATCHDOG and fault.detail == 1
            wait_until(lambda: any(isinstance(e, NakEvent) and e.reason == NakReason.WATCHDOG
                                   for e in events + link.poll_events()), what="Ended(WATCHDOG) of command 1")
            # The MCU heard every frame the host wrote (pty: lossless), so its silence is the host's.
            wait_until(lambda: mcu_frames_rx() == link.health()["frames_tx"], timeout=2.0,
                       what="the MCU to have received every host frame")
            assert mcu_trips() == 1
            # The rule, on the MCU's own clock (not wall-clock, so host scheduling cannot skew it): the trip
            # came strictly after watchdog_ms of silence since the last host frame, in the first service
            # pass past that deadline (the pass before it was still within the deadline), and no host frame
            # had been received since the last one before the silence.
            if kind == "python-sim":
                trip = served.last_watchdog_trip
                assert trip is not None
                last_rx_us, prev_us, trip_us = (round(t * 1e6) for t in
                                                (trip.last_host_rx_s, trip.previous_check_s, trip.trip_s))
                frames_at_trip = trip.frames_rx
            else:
                st = served.state()
                last_rx_us, prev_us, trip_us = st["wd_last_rx"], st["wd_prev_poll"], st["wd_trip"]
                frames_at_trip = st["wd_frames_rx"]
            assert trip_us - last_rx_us > WATCHDOG_MS * 1000, (last_rx_us, prev_us, trip_us)
            assert last_rx_us <= prev_us and prev_us - last_rx_us <= WATCHDOG_MS * 1000, (last_rx_us, prev_us, trip_us)
            # Every host frame but the EventAcks (of the trip's Ended and Fault, every copy; there were no
            # events before it) had reached the MCU when it tripped: its last one was the host's last one.
            def before_trip() -> int:
                h = link.health()
                return h["frames_tx"] - h["events_rx"] - h["event_dups"]

            wait_until(lambda: before_trip() == frames_at_trip, what=f"{frames_at_trip} host frames before the trip")
    fired = list(env.actuations) if kind == "python-sim" else served.fired()
    assert fired == []
    return True


@pytest.mark.parametrize("kind", MCU_KINDS)
def test_watchdog_in_real_time_when_host_goes_silent(kind: str, request: pytest.FixtureRequest) -> None:
    """A real-time belt: the host stops heartbeating; the MCU's own clock trips the watchdog.

    Timing is judged on the MCU's clock (its record of the trip), so a loaded test machine that delays the
    Fault's arrival cannot fail it, and cannot hide an early or late trip either (bench/link.py measures the
    wall-clock time to safe state). A trial in which the host's own threads stalled past the watchdog before
    the silence began (the MCU then rightly trips early) is repeated, at most three times.
    """
    for _ in range(3):
        if _silent_host_trial(kind, request):
            return
    pytest.fail("the host stalled >= 250 ms before going silent in 3 trials: the machine is too loaded")


def test_a_restarted_station_never_reuses_a_command_id_the_mcu_remembers(mcu) -> None:
    """The host restarts, the MCU runs on: the new run's commands must fire, not be taken for repeats."""
    from station.core import command_id_base

    def run(first_id: int, at_count: int) -> list[int]:
        link = DiverterLink(mcu.slave_path)
        try:
            link.open(timeout=2.0)
            link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
            for _ in range(2):
                mcu.advance(10)
            ids = [first_id + k for k in range(3)]
            for k, cid in enumerate(ids):
                link.fire_at(cid, 0, belt_count=at_count + 50 * k, pulse_ms=20)
            assert link.wait_settled(1.0)
            mcu.advance(400)
            return ids
        finally:
            link.close()

    t0 = 1_764_000_000.0                                       # a run, then a restart 5 s later
    first = run(command_id_base(t0), at_count=100)
    second = run(command_id_base(t0 + 5.0), at_count=mcu.count + 100)
    fired = [s.command_id for s in mcu.shots()]
    assert fired == first + second                             # all six fired, each once
    # what counting from 1 on every start would do: the old answer, and nothing queued or fired
    link = DiverterLink(mcu.slave_path)
    try:
        link.open(timeout=2.0)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        link.fire_at(first[0], 0, belt_count=mcu.count + 100, pulse_ms=20)
        assert link.wait_settled(1.0)
        mcu.advance(400)
        assert [s.command_id for s in mcu.shots()] == fired and mcu.queue_depth == 0
    finally:
        link.close()
