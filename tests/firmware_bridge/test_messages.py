"""Message layer: encode/decode are exact inverses; bad input fails with a clear error."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from firmware_bridge.framing import Frame, FrameDecoder
from firmware_bridge.messages import (
    MAX_DIVERTERS,
    Ack,
    Arm,
    BeltRun,
    Cancel,
    Configure,
    DiverterSetup,
    EncoderReport,
    Ended,
    EventAck,
    Fault,
    FaultCode,
    FireAt,
    FireNow,
    Fired,
    Heartbeat,
    Hello,
    Identify,
    Nak,
    NakReason,
    ProtocolError,
    ProtocolVersionMismatch,
    Status,
    UnknownMessageType,
    decode_message,
    encode_message,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
i64 = st.integers(-(2**63), 2**63 - 1)
u64 = st.integers(0, 2**64 - 1)
f32 = st.floats(width=32, allow_nan=False)

messages = st.one_of(
    st.builds(
        Configure,
        mm_per_count=f32,
        diverters=st.lists(st.builds(DiverterSetup, id=u8, latency_us=u32, max_on_ms=u16), max_size=MAX_DIVERTERS)
        .map(tuple),
        watchdog_ms=u16,
        report_interval_ms=u16,
    ),
    st.builds(FireAt, command_id=u32, diverter=u8, belt_count=i64, pulse_ms=u16),
    st.builds(FireNow, command_id=u32, diverter=u8, pulse_ms=u16),
    st.builds(Cancel, command_id=u32),
    st.builds(Heartbeat, mcu_time_us=u64, boot_id=u32),
    st.just(Identify()),
    st.builds(EventAck, boot_id=u32, event_seq=u32),
    st.builds(Hello, boot_id=u32, fw_version=u16, protocol_version=u8, config_crc=u32),
    st.builds(Ack, seq=u8, msg_type=u8, command_id=u32),
    st.builds(Nak, seq=u8, msg_type=u8, command_id=u32, reason=st.sampled_from(NakReason)),
    st.builds(Fired, boot_id=u32, event_seq=u32, command_id=u32, diverter=u8, actual_count=i64, mcu_time_us=u64),
    st.builds(Ended, boot_id=u32, event_seq=u32, command_id=u32, reason=st.sampled_from(NakReason)),
    st.builds(EncoderReport, count=i64, mcu_time_us=u64),
    st.builds(Fault, boot_id=u32, event_seq=u32, code=st.sampled_from(FaultCode), detail=u32),
    st.builds(Status, queue_depth=u8, estop=st.booleans(), configured=st.booleans(), watchdog_tripped=st.booleans(),
              events_pending=u8, events_dropped=u16, armed=st.booleans(), belt_running=st.booleans()),
    st.builds(BeltRun, run=u8),
    st.builds(Arm, arm=u8),
)


@given(messages, u8)
def test_round_trip_through_the_wire(msg, seq: int) -> None:
    frames = FrameDecoder().feed(encode_message(msg, seq))
    assert len(frames) == 1 and frames[0].seq == seq
    assert decode_message(frames[0]) == msg


@given(messages)
def test_payload_round_trip(msg) -> None:
    assert type(msg).decode_payload(msg.encode_payload()) == msg


def test_unknown_type_is_a_clear_error() -> None:
    with pytest.raises(UnknownMessageType, match="unknown message type 0x7f"):
        decode_message(Frame(3, 3, 0x7F, b""))


def test_wrong_version_is_refused() -> None:
    with pytest.raises(ProtocolVersionMismatch, match="protocol version 2, this side speaks 3"):
        decode_message(Frame(2, 0, 0x05, bytes(12)))


def test_wrong_payload_length_is_refused() -> None:
    with pytest.raises(ProtocolError, match="must be 15 bytes"):
        decode_message(Frame(3, 0, 0x02, bytes(14)))
    with pytest.raises(ProtocolError, match="announces 2 diverters"):
        head = Configure(1.0, ()).encode_payload()  # 9 bytes, last one is the diverter count
        decode_message(Frame(3, 0, 0x01, head[:-1] + b"\x02"))


def test_unknown_enum_value_is_refused() -> None:
    payload = Nak(0, 2, 1, NakReason.LATE).encode_payload()[:-1] + b"\xee"
    with pytest.raises(ProtocolError, match="reason: unknown value 238"):
        Nak.decode_payload(payload)


def test_out_of_range_value_fails_on_encode() -> None:
    with pytest.raises(ProtocolError, match="FireAt"):
        FireAt(command_id=-1, diverter=0, belt_count=0, pulse_ms=10).encode_payload()
    with pytest.raises(ProtocolError, match="at most 35"):
        Configure(1.0, tuple(DiverterSetup(i, 0, 1) for i in range(36))).encode_payload()
