"""Kozan diverter link: the serial protocol (PROTOCOL.md), its host side and a firmware simulator.

Names are imported lazily so that ``python -m firmware_bridge.simulator`` does not import the simulator
twice, and so that importing the package for one class stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # host side
    "DiverterLink": "link",
    "LinkError": "link",
    "BeltClock": "belt_clock",
    "BeltClockNotReady": "belt_clock",
    # events
    "LinkEvent": "events",
    "AckEvent": "events",
    "NakEvent": "events",
    "FiredEvent": "events",
    "FaultEvent": "events",
    "ResetEvent": "events",
    "CommandTimeoutEvent": "events",
    "LinkErrorEvent": "events",
    "LinkRestoredEvent": "events",
    "McuClock": "clock_sync",
    "McuClockNotReady": "clock_sync",
    # protocol
    "DiverterSetup": "messages",
    "NakReason": "messages",
    "FaultCode": "messages",
    "MsgType": "messages",
    "ProtocolError": "messages",
    "PROTOCOL_VERSION": "messages",
    "Frame": "framing",
    "FrameDecoder": "framing",
    # simulation
    "McuEnvironment": "environment",
    "ConstantSpeedEnvironment": "environment",
    "FirmwareSimulator": "simulator",
    "NativeFirmware": "native",
    "build_host_firmware": "native",
    "open_pty_pair": "pseudo_terminal",
    "close_pty_pair": "pseudo_terminal",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'firmware_bridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .belt_clock import BeltClock, BeltClockNotReady
    from .environment import ConstantSpeedEnvironment, McuEnvironment
    from .events import (
        AckEvent, CommandTimeoutEvent, FaultEvent, FiredEvent, LinkErrorEvent, LinkEvent, LinkRestoredEvent,
        NakEvent, ResetEvent,
    )
    from .clock_sync import McuClock, McuClockNotReady
    from .framing import Frame, FrameDecoder
    from .link import DiverterLink, LinkError
    from .messages import PROTOCOL_VERSION, DiverterSetup, FaultCode, MsgType, NakReason, ProtocolError
    from .native import NativeFirmware, build_host_firmware
    from .pseudo_terminal import close_pty_pair, open_pty_pair
    from .simulator import FirmwareSimulator
