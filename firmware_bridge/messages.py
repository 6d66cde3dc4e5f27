"""Typed messages of the diverter link and their byte layouts (PROTOCOL.md §3).

Each message is a frozen dataclass with a ``TYPE`` and a ``struct`` layout; ``encode_payload`` and
``decode_payload`` are exact inverses (property-tested). Values are range-checked on encode so that a
wrong value fails loudly on the host, not as a mysterious Nak from the MCU.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, ClassVar, Union

from .framing import Frame, FramingError, encode_frame

PROTOCOL_VERSION = 3
MAX_DIVERTERS = 35  # (255 - 9) // 7: what fits in one Configure payload


class ProtocolError(ValueError):
    """A frame was structurally valid but its content does not follow PROTOCOL.md."""


class UnknownMessageType(ProtocolError):
    """The msg_type byte names no message this side knows."""


class ProtocolVersionMismatch(ProtocolError):
    """The peer speaks a different protocol version."""


class MsgType(IntEnum):
    CONFIGURE = 0x01
    FIRE_AT = 0x02
    FIRE_NOW = 0x03
    CANCEL = 0x04
    HEARTBEAT = 0x05
    IDENTIFY = 0x06
    EVENT_ACK = 0x07
    BELT_RUN = 0x08
    ARM = 0x09
    GATE_SETUP = 0x0A
    HELLO = 0x80
    ACK = 0x81
    NAK = 0x82
    FIRED = 0x83
    ENCODER_REPORT = 0x84
    FAULT = 0x85
    STATUS = 0x86
    ENDED = 0x87
    INPUT_EDGE = 0x88


class NakReason(IntEnum):
    LATE = 1
    QUEUE_FULL = 2
    BAD_PARAMS = 3
    NOT_CONFIGURED = 4
    UNKNOWN_DIVERTER = 5
    ESTOP = 6
    WATCHDOG = 7
    NOT_QUEUED = 8
    UNSUPPORTED = 9
    CANCELLED = 10  # only in Ended: the host's Cancel removed the queued command
    NOT_ARMED = 11  # e-stop released (or host disarmed) but no Arm(1) from the host since (PROTOCOL.md §6)


class FaultCode(IntEnum):
    WATCHDOG = 1
    ESTOP = 2
    BAD_VERSION = 3


class _Fixed:
    """Mixin for messages with a fixed struct layout; field order == struct order."""

    TYPE: ClassVar[MsgType]
    _FMT: ClassVar[struct.Struct]
    _ENUMS: ClassVar[dict[str, type[IntEnum]]] = {}

    def encode_payload(self) -> bytes:
        values = [getattr(self, f.name) for f in fields(self)]  # type: ignore[arg-type]
        try:
            return self._FMT.pack(*values)
        except struct.error as exc:
            raise ProtocolError(
                f"{type(self).__name__}{tuple(values)} does not fit its wire layout "
                f"{self._FMT.format!r}: {exc}; check the value ranges in PROTOCOL.md §3"
            ) from None

    @classmethod
    def decode_payload(cls, payload: bytes) -> Any:
        if len(payload) != cls._FMT.size:
            raise ProtocolError(
                f"{cls.__name__} payload must be {cls._FMT.size} bytes, got {len(payload)}"
            )
        values = list(cls._FMT.unpack(payload))
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        for i, name in enumerate(names):
            enum = cls._ENUMS.get(name)
            if enum is not None:
                try:
                    values[i] = enum(values[i])
                except ValueError:
                    raise ProtocolError(f"{cls.__name__}.{name}: unknown value {values[i]}") from None
        return cls(*values)


@dataclass(frozen=True)
class DiverterSetup:
    """One actuator: its id, its latency from output-on to effect, and its maximum on-time."""

    id: int
    latency_us: int
    max_on_ms: int


_DIVERTER = struct.Struct("<BIH")
_CONFIGURE_HEAD = struct.Struct("<fHHB")


@dataclass(frozen=True)
class Configure:
    TYPE: ClassVar[MsgType] = MsgType.CONFIGURE
    mm_per_count: float
    diverters: tuple[DiverterSetup, ...]
    watchdog_ms: int = 250
    report_interval_ms: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "diverters", tuple(self.diverters))

    def encode_payload(self) -> bytes:
        if len(self.diverters) > MAX_DIVERTERS:
            raise ProtocolError(
                f"Configure has {len(self.diverters)} diverters; one MCU takes at most {MAX_DIVERTERS}"
            )
        try:
            head = _CONFIGURE_HEAD.pack(
                self.mm_per_count, self.watchdog_ms, self.report_interval_ms, len(self.diverters)
            )
            body = b"".join(_DIVERTER.pack(d.id, d.latency_us, d.max_on_ms) for d in self.diverters)
        except (struct.error, OverflowError) as exc:
            raise ProtocolError(f"Configure {self} does not fit its wire layout: {exc}") from None
        return head + body

    @classmethod
    def decode_payload(cls, payload: bytes) -> Configure:
        if len(payload) < _CONFIGURE_HEAD.size:
            raise ProtocolError(f"Configure payload too short ({len(payload)} bytes)")
        mm, wd, rep, n = _CONFIGURE_HEAD.unpack_from(payload)
        expected = _CONFIGURE_HEAD.size + n * _DIVERTER.size
        if len(payload) != expected:
            raise ProtocolError(
                f"Configure announces {n} diverters ({expected} bytes) but carries {len(payload)} bytes"
            )
        divs = tuple(
            DiverterSetup(*_DIVERTER.unpack_from(payload, _CONFIGURE_HEAD.size + i * _DIVERTER.size))
            for i in range(n)
        )
        return cls(mm_per_count=mm, diverters=divs, watchdog_ms=wd, report_interval_ms=rep)


@dataclass(frozen=True)
class FireAt(_Fixed):
    TYPE: ClassVar[MsgType] = MsgType.FIRE_AT
    _FMT: ClassVar[struct.Struct] = struct.Struct("<IBqH")
    command_id: int
    diverter: int
    belt_count: int
    pulse_ms: int


@dataclass(frozen=True)
class FireNow(_Fixed):
    TYPE: ClassVar[MsgType] = MsgType.FIRE_NOW
    _FMT: ClassVar[struct.Struct] = struct.Struct("<IBH")
    command_id: int
    diverter: int
    pulse_ms: int


@dataclass(frozen=True)
class Cancel(_Fixed):
    TYPE: ClassVar[MsgType] = MsgType.CANCEL
    _FMT: ClassVar[struct.Struct] = struct.Struct("<I")
    command_id: int


@dataclass(frozen=True)
class Heartbeat(_Fixed):
    """Both ways. The MCU's carries its clock and its boot id (so a reset is noticed even if its Hello was
    lost on the line); the host sends zeros."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    _FMT: ClassVar[struct.Struct] = struct.Struct("<QI")
    mcu_time_us: int = 0
    boot_id: int = 0


@dataclass(frozen=True)
class Identify(_Fixed):
    TYPE: ClassVar[MsgType] = MsgType.IDENTIFY
    _FMT: ClassVar[struct.Struct] = struct.Struct("<")


@dataclass(frozen=True)
class EventAck(_Fixed):
    """The host has an MCU event (Fired, Ended, Fault): stop re-sending it (PROTOCOL.md §6a)."""

    TYPE: ClassVar[MsgType] = MsgType.EVENT_ACK
    _FMT: ClassVar[struct.Struct] = struct.Struct("<II")
    boot_id: int
    event_seq: int


@dataclass(frozen=True)
class BeltRun(_Fixed):
    """Switch the MCU's belt-run output (PROTOCOL.md §5a): ``run`` 1 = run, 0 = stop. Answered like
    Configure (Ack/Nak matched by ``seq``), and idempotent, so the host re-sends it until answered."""

    TYPE: ClassVar[MsgType] = MsgType.BELT_RUN
    _FMT: ClassVar[struct.Struct] = struct.Struct("<B")
    run: int


@dataclass(frozen=True)
class Arm(_Fixed):
    """``arm`` 1: the explicit re-arm after an e-stop (the operator's reset); 0: disarm (flush the queue and
    refuse fires until re-armed). PROTOCOL.md §6. Idempotent, answered like Configure."""

    TYPE: ClassVar[MsgType] = MsgType.ARM
    _FMT: ClassVar[struct.Struct] = struct.Struct("<B")
    arm: int


@dataclass(frozen=True)
class Hello(_Fixed):
    TYPE: ClassVar[MsgType] = MsgType.HELLO
    _FMT: ClassVar[struct.Struct] = struct.Struct("<IHBI")
    boot_id: int
    fw_version: int
    protocol_version: int
    config_crc: int


@dataclass(frozen=True)
class Ack(_Fixed):
    """Answers frame ``seq`` of type ``msg_type`` (a raw byte, so unknown types can be answered too)."""

    TYPE: ClassVar[MsgType] = MsgType.ACK
    _FMT: ClassVar[struct.Struct] = struct.Struct("<BBI")
    seq: int
    msg_type: int
    command_id: int = 0


@dataclass(frozen=True)
class Nak(_Fixed):
    TYPE: ClassVar[MsgType] = MsgType.NAK
    _FMT: ClassVar[struct.Struct] = struct.Struct("<BBIB")
    _ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"reason": NakReason}
    seq: int
    msg_type: int
    command_id: int
    reason: NakReason


@dataclass(frozen=True)
class Fired(_Fixed):
    """Event (re-sent until acked): the command fired."""

    TYPE: ClassVar[MsgType] = MsgType.FIRED
    _FMT: ClassVar[struct.Struct] = struct.Struct("<IIIBqQ")
    boot_id: int
    event_seq: int
    command_id: int
    diverter: int
    actual_count: int
    mcu_time_us: int


@dataclass(frozen=True)
class EncoderReport(_Fixed):
    TYPE: ClassVar[MsgType] = MsgType.ENCODER_REPORT
    _FMT: ClassVar[struct.Struct] = struct.Struct("<qQ")
    count: int
    mcu_time_us: int


@dataclass(frozen=True)
class Fault(_Fixed):
    """Event (re-sent until acked): something the station must be told of."""

    TYPE: ClassVar[MsgType] = MsgType.FAULT
    _FMT: ClassVar[struct.Struct] = struct.Struct("<IIBI")
    _ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"code": FaultCode}
    boot_id: int
    event_seq: int
    code: FaultCode
    detail: int = 0


@dataclass(frozen=True)
class Status(_Fixed):
    TYPE: ClassVar[MsgType] = MsgType.STATUS
    _FMT: ClassVar[struct.Struct] = struct.Struct("<B???BH??")
    queue_depth: int
    estop: bool
    configured: bool
    watchdog_tripped: bool
    events_pending: int = 0  # events sent but not yet acked by the host
    events_dropped: int = 0  # events evicted unacked from a full event buffer (this boot)
    armed: bool = True  # False after an e-stop (or a host Arm(0)) until the host's Arm(1)
    belt_running: bool = False  # the belt-run output


@dataclass(frozen=True)
class Ended(_Fixed):
    """Event (re-sent until acked): an accepted command ended without firing and never will.

    ``reason`` is CANCELLED (the host's Cancel), WATCHDOG, ESTOP, NOT_CONFIGURED or NOT_ARMED (the host's
    Arm(0))."""

    TYPE: ClassVar[MsgType] = MsgType.ENDED
    _FMT: ClassVar[struct.Struct] = struct.Struct("<IIIB")
    _ENUMS: ClassVar[dict[str, type[IntEnum]]] = {"reason": NakReason}
    boot_id: int
    event_seq: int
    command_id: int
    reason: NakReason


@dataclass(frozen=True)
class GateSetup(_Fixed):
    """Which digital inputs (light gates, actuator sensors) the MCU reports as ``InputEdge`` events: bit i of
    ``mask`` = input i (PROTOCOL.md §6b). Answered like Configure (Ack/Nak by ``seq``), idempotent; a new
    boot starts with 0 (none). An MCU without gate support answers Nak(UNSUPPORTED)."""

    TYPE: ClassVar[MsgType] = MsgType.GATE_SETUP
    _FMT: ClassVar[struct.Struct] = struct.Struct("<I")
    mask: int


@dataclass(frozen=True)
class InputEdge(_Fixed):
    """Event (re-sent until acked): a reported digital input changed level, stamped by the MCU (in the pin
    interrupt) with the encoder count and its clock at the edge (PROTOCOL.md §6b)."""

    TYPE: ClassVar[MsgType] = MsgType.INPUT_EDGE
    _FMT: ClassVar[struct.Struct] = struct.Struct("<IIBBqQ")
    boot_id: int
    event_seq: int
    input: int
    rising: int
    count: int
    mcu_time_us: int


Message = Union[
    Configure, FireAt, FireNow, Cancel, Heartbeat, Identify, EventAck, BeltRun, Arm,
    Hello, Ack, Nak, Fired, EncoderReport, Fault, Status, Ended, GateSetup, InputEdge,
]
#: MCU messages that are events: numbered per boot, re-sent until the host sends EventAck.
EVENT_TYPES = (Fired, Ended, Fault, InputEdge)

MESSAGE_CLASSES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (
        Configure, FireAt, FireNow, Cancel, Heartbeat, Identify, EventAck, BeltRun, Arm,
        Hello, Ack, Nak, Fired, EncoderReport, Fault, Status, Ended, GateSetup, InputEdge,
    )
}
HOST_TO_MCU = frozenset(
    {MsgType.CONFIGURE, MsgType.FIRE_AT, MsgType.FIRE_NOW, MsgType.CANCEL, MsgType.HEARTBEAT, MsgType.IDENTIFY,
     MsgType.EVENT_ACK, MsgType.BELT_RUN, MsgType.ARM, MsgType.GATE_SETUP}
)
MCU_TO_HOST = frozenset(
    {MsgType.HELLO, MsgType.ACK, MsgType.NAK, MsgType.FIRED, MsgType.ENCODER_REPORT, MsgType.FAULT,
     MsgType.STATUS, MsgType.HEARTBEAT, MsgType.ENDED, MsgType.INPUT_EDGE}
)


def message_to_frame(msg: Message, seq: int) -> Frame:
    return Frame(version=PROTOCOL_VERSION, seq=seq & 0xFF, msg_type=int(msg.TYPE), payload=msg.encode_payload())


def encode_message(msg: Message, seq: int) -> bytes:
    """Wire bytes (framed, COBS-encoded, delimited) for ``msg`` sent as frame number ``seq``."""
    try:
        return encode_frame(message_to_frame(msg, seq))
    except FramingError as exc:
        raise ProtocolError(str(exc)) from None


def decode_message(frame: Frame) -> Message:
    """Typed message from a validated frame; raises a :class:`ProtocolError` subclass saying why not."""
    if frame.version != PROTOCOL_VERSION:
        raise ProtocolVersionMismatch(
            f"frame seq {frame.seq} has protocol version {frame.version}, this side speaks "
            f"{PROTOCOL_VERSION}: update the firmware or the host so both match"
        )
    cls = MESSAGE_CLASSES.get(frame.msg_type)
    if cls is None:
        raise UnknownMessageType(
            f"unknown message type 0x{frame.msg_type:02x} (seq {frame.seq}, {len(frame.payload)}-byte "
            f"payload): the peer uses a newer protocol revision or is not a Kozan diverter MCU"
        )
    return cls.decode_payload(frame.payload)  # type: ignore[no-any-return]
