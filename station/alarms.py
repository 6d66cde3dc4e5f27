"""Alarms the operator must see: raised by the loop, acknowledged by a person.

An alarm that repeats (say, items missed one after another) is one alarm with a count, not a
flood: the operator needs to know *that* it is happening and how often, not a scrolling list.

Each alarm carries, besides its English `message` (logs, records, reports), the name of a detail
template and the values for its placeholders: the HMI renders `alarm_detail.<detail>` from its
translation file with `params` (and falls back to `message` only where a language lacks the
template). `detail` is the code itself, or `<code>.<variant>` where one code is raised for
differently worded causes (say, `capture_stopped.quota`). Parameters are plain values (numbers,
ids, class names, technical text such as an OS error); `class` is a class name the page translates.
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
    detail: str = ""       # translation template: alarm_detail.<detail> (code or code.variant)
    params: dict = field(default_factory=dict)   # values for the template's {placeholders}


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.FAULT: 2}


def _plain(v: object) -> object:
    """A JSON-ready parameter value: numbers and text stay, numpy scalars become numbers, the rest text."""
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()  # type: ignore[union-attr]
        except (TypeError, ValueError):
            pass
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


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

    def raise_(self, code: str, severity: Severity, message: str, item_id: int | None = None, *,
               detail: str | None = None, params: dict | None = None) -> Alarm:
        """Raise (or repeat) `code`. `message` is the English text; `detail` (default: `code`) names
        the page's template `alarm_detail.<detail>` and `params` fills its placeholders."""
        now = self._clock()
        detail = detail or code
        params = {k: _plain(v) for k, v in (params or {}).items()}
        with self._lock:
            a = self._alarms.get(code)
            if a is not None and not a.acknowledged:
                a.count += 1
                a.last_s = now
                a.message = message
                a.detail, a.params = detail, params
                if _RANK[severity] > _RANK[a.severity]:   # a warning that becomes a fault shows as one
                    a.severity = severity
            else:
                a = Alarm(self._next, code, severity, message, now, now, detail=detail, params=params)
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
