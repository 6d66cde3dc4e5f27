"""The line's state machine: idle, running, paused, fault, e-stop.

Only a few transitions are legal, and leaving FAULT or ESTOP takes an explicit reset by a
person: a line must never restart by itself after something went wrong.
"""
from __future__ import annotations

import enum
import logging
import threading

log = logging.getLogger(__name__)


class LineState(str, enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    PAUSED = "paused"
    FAULT = "fault"
    ESTOP = "estop"


class IllegalTransition(RuntimeError):
    pass


_ALLOWED = {
    ("idle", "running"), ("paused", "running"), ("running", "paused"), ("running", "idle"),
    ("paused", "idle"), ("fault", "idle"), ("estop", "idle"),
}


class StateMachine:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = LineState.IDLE
        self.reason = ""

    def _go(self, new: LineState, reason: str = "") -> None:
        with self._lock:
            if new in (LineState.FAULT, LineState.ESTOP):      # always reachable
                pass
            elif (self.state.value, new.value) not in _ALLOWED:
                raise IllegalTransition(f"cannot go from {self.state.value} to {new.value}"
                                        + (" (reset the fault first)" if self.state in (LineState.FAULT, LineState.ESTOP) else ""))
            log.info("line state %s -> %s %s", self.state.value, new.value, reason)
            self.state, self.reason = new, reason

    def start(self) -> None:
        self._go(LineState.RUNNING)

    def pause(self) -> None:
        self._go(LineState.PAUSED)

    def stop(self) -> None:
        if self.state in (LineState.RUNNING, LineState.PAUSED):
            self._go(LineState.IDLE)

    def fault(self, reason: str) -> None:
        self._go(LineState.FAULT, reason)

    def estop(self, reason: str = "e-stop pressed") -> None:
        self._go(LineState.ESTOP, reason)

    def reset(self) -> None:
        if self.state in (LineState.FAULT, LineState.ESTOP):
            self._go(LineState.IDLE, "reset by operator")
