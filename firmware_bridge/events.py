"""What the diverter link tells the station loop, drained with ``DiverterLink.poll_events()``.

Every event carries ``host_time_s``: the link's injected clock at receipt, so virtual-time runs stay
deterministic. A FireAt's story is: ``AckEvent`` then ``FiredEvent`` (or a ``NakEvent`` with its
command_id); or ``NakEvent`` alone; or ``CommandTimeoutEvent`` (never answered); or it is listed in a
``ResetEvent`` (the MCU rebooted and lost it, or it was still unanswered then).
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import FaultCode, MsgType, NakReason


@dataclass(frozen=True)
class LinkEvent:
    host_time_s: float


@dataclass(frozen=True)
class AckEvent(LinkEvent):
    command_id: int
    msg_type: int  # MsgType value of the acked message


@dataclass(frozen=True)
class NakEvent(LinkEvent):
    command_id: int
    reason: NakReason
    msg_type: int = int(MsgType.FIRE_AT)


@dataclass(frozen=True)
class FiredEvent(LinkEvent):
    command_id: int
    diverter: int
    actual_count: int
    mcu_time_us: int


@dataclass(frozen=True)
class FaultEvent(LinkEvent):
    code: FaultCode
    detail: int


@dataclass(frozen=True)
class ResetEvent(LinkEvent):
    """The MCU rebooted (new boot_id). ``lost_command_ids`` will never fire (from now on): the ones it had
    acked, and the ones still unanswered, which the link does not retransmit to the new boot (the old boot
    may have fired them with the answers lost, and their counts are in the old boot's encoder frame)."""

    boot_id: int
    lost_command_ids: tuple[int, ...]
    reconfigure_sent: bool


@dataclass(frozen=True)
class CommandTimeoutEvent(LinkEvent):
    """A FireAt/FireNow got no answer after all retransmissions: treat the item as missed."""

    command_id: int
    attempts: int


@dataclass(frozen=True)
class LinkErrorEvent(LinkEvent):
    """The serial port failed (unplugged, permission lost); the link is down until re-opened."""

    message: str
