"""What the diverter link tells the station loop, drained with ``DiverterLink.poll_events()``.

Every event carries ``host_time_s``: the link's injected clock at receipt, so virtual-time runs stay
deterministic. A FireAt's story is: ``AckEvent`` then ``FiredEvent`` (or a ``NakEvent`` with its
command_id); or ``NakEvent`` alone; or ``CommandTimeoutEvent`` (never answered); or it is listed in a
``ResetEvent`` (the MCU rebooted and lost it, or it was still unanswered then). A lost port is a
``LinkErrorEvent`` (naming the commands in doubt) and, once the link has re-opened it by itself, a
``LinkRestoredEvent``.
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
class InputEdgeEvent(LinkEvent):
    """A digital input the host asked for (``DiverterLink.gate_setup``) changed level: ``rising`` True when
    it became active (a light gate's beam blocked, an actuator sensor reached). ``count`` and
    ``mcu_time_us`` were taken by the MCU at the edge (PROTOCOL.md §6b), so they are as exact as a Fired's."""

    input: int
    rising: bool
    count: int
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
    """The serial port failed (unplugged, permission lost, the far end closed).

    ``in_doubt_command_ids``: commands sent but not finished when the port went (unanswered, or acked and not
    yet fired): while the link is down, treat those items as missed unless a ``FiredEvent`` arrives later.
    ``reconnecting``: the link re-opens the port by itself, with backoff; a ``LinkRestoredEvent`` follows
    when the MCU answers again, and then every in-doubt command gets its final outcome as usual (or is
    listed in a ``ResetEvent`` if the MCU reset meanwhile). False: the link is down until ``reopen()``.
    One per outage: a re-opened port failing again before the MCU answered is not a new one.
    """

    message: str
    in_doubt_command_ids: tuple[int, ...] = ()
    reconnecting: bool = False


@dataclass(frozen=True)
class LinkRestoredEvent(LinkEvent):
    """The port is open again and the MCU has said Hello (``reconnects`` so far, ``down_s`` this time).

    ``mcu_reset``: the Hello's boot id is not the one before the loss. The link has then already reported
    the reset (``ResetEvent``, with the commands that died) and re-sent the configuration."""

    reconnects: int
    boot_id: int
    mcu_reset: bool
    down_s: float
