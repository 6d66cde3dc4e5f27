"""Alarms the operator must see: raised by the loop, acknowledged by a person.

An alarm that repeats (say, items missed one after another) is one alarm with a count, not a
flood: the operator needs to know *that* it is happening and how often, not a scrolling list.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    FAULT = "fault"        # the line cannot sort correctly until someone acts


@dataclass
class Alarm:
    id: int
    code: str              # missed_item, link_lost, camera_lost, mcu_reset, diverter_fault, ...
    severity: Severity
    message: str
    first_s: float
    last_s: float
    count: int = 1
    acknowledged: bool = False
    item_ids: list[int] = field(default_factory=list)


class AlarmBoard:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._alarms: dict[str, Alarm] = {}
        self._next = 1
        self.history: list[Alarm] = []
        # called outside the lock with (alarm, item_id) on every raise, repeats included (the records
        # writer keeps each one); a listener must not block and its failure is logged, not raised
        self.listeners: list = []

    def raise_(self, code: str, severity: Severity, message: str, item_id: int | None = None) -> Alarm:
        now = self._clock()
        with self._lock:
            a = self._alarms.get(code)
            if a is not None and not a.acknowledged:
                a.count += 1
                a.last_s = now
                a.message = message
            else:
                a = Alarm(self._next, code, severity, message, now, now)
                self._next += 1
                self._alarms[code] = a
                self.history.append(a)
                (log.error if severity == Severity.FAULT else log.warning)("alarm %s: %s", code, message)
            if item_id is not None and len(a.item_ids) < 100:
                a.item_ids.append(item_id)
        for fn in list(self.listeners):
            try:
                fn(a, item_id)
            except Exception:
                log.exception("alarm listener failed (ignored)")
        return a

    def acknowledge(self, alarm_id: int) -> bool:
        with self._lock:
            for a in self._alarms.values():
                if a.id == alarm_id:
                    a.acknowledged = True
                    return True
        return False

    def active(self) -> list[Alarm]:
        with self._lock:
            return [a for a in self._alarms.values() if not a.acknowledged]

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for a in self.history:
                out[a.code] = out.get(a.code, 0) + a.count
            return out
