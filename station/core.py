"""One frame's journey: detect → track → decide → command, and what the link says back.

`StationCore` owns no threads and no clock of its own, so the same code runs a real line, the
simulated line in real time and the simulated line in virtual time. Runners (`station.runtime`,
`station.simrun`) decide where frames come from and when time moves.

Timing (DESIGN.md, settled): a divert command names the encoder count at which its diverter must
fire. A command that cannot reach the MCU before `line.command_margin_ms` ahead of that count is
never sent: the item is counted as missed, rides to the end of the belt, and the operator is told.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from calibration.geometry import BeltGeometry
from station.alarms import AlarmBoard, Severity
from station.config import MANUAL_BIN, StationConfig
from station.records import ItemRecord, Records
from station.sorting import Decision, Reason, Sorter
from vision.detections import Detections
from vision.frame import Frame
from vision.taxonomy import Taxonomy
from vision.tracking import BeltTracker, Track

log = logging.getLogger(__name__)


class Link(Protocol):
    """What the core needs of the diverter link (firmware_bridge.DiverterLink provides it)."""

    def fire_at(self, command_id: int, diverter: int, belt_count: int, pulse_ms: float) -> None: ...
    def poll_events(self) -> list[Any]: ...


class DetectorLike(Protocol):
    names: tuple[str, ...]

    def __call__(self, image: Any) -> Detections: ...


class LooksLike(Protocol):
    """Runs the inspectors' looks (station.looks)."""

    kinds: set[str]
    inspectors: dict[str, Any]         # kind -> inspector (its `names`: the classes its answers index)

    def busy(self, kind: str) -> bool: ...
    def submit(self, kind: str, track_id: int, image: Any, box: Any) -> None: ...
    def take(self) -> list[tuple[str, int, Any]]: ...


@dataclass
class FrameResult:
    frame: Frame
    detections: Detections
    count: int
    tracks: list[Track]
    decisions: list[Decision]


@dataclass
class Counters:
    frames: int = 0
    decided: int = 0
    per_bin: Counter = field(default_factory=Counter)           # decisions per bin
    per_class: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    sent: int = 0
    acked: int = 0
    fired: int = 0
    missed: int = 0                                             # not sent in time, or NAKed late
    naks: Counter = field(default_factory=Counter)
    lost_tracks: int = 0                                        # undecided tracks dropped (flicker)
    board_looks: int = 0                                        # board crops the inspector looked at
    battery_looks: int = 0                                      # battery crops the inspector read

    def as_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "decided": self.decided, "per_bin": dict(self.per_bin),
                "per_class": dict(self.per_class), "reasons": dict(self.reasons), "sent": self.sent,
                "acked": self.acked, "fired": self.fired, "missed": self.missed, "naks": dict(self.naks),
                "lost_tracks": self.lost_tracks, "board_looks": self.board_looks,
                "battery_looks": self.battery_looks}


def command_id_base(wall_s: float | None = None) -> int:
    """Where a real station's command ids start: milliseconds of wall time, modulo 2**31.

    The MCU answers a command id it has seen this boot with its first answer and never queues it
    twice (PROTOCOL.md), remembering the last 1024. A station restarted while the MCU runs on would,
    counting from 1 again, have its new commands taken for repeats: acked and never fired. Starting
    from the clock puts each run's ids past the last run's (a run issues far fewer than one id per
    millisecond); the range wraps every 24.8 days. Virtual-time runs start at 1 (reproducible).
    """
    ms = int((time.time() if wall_s is None else wall_s) * 1000.0)
    return ms % (1 << 31) + 1


class StationCore:
    def __init__(self, cfg: StationConfig, detector: DetectorLike, link: Link, records: Records,
                 taxonomy: Taxonomy, geometry: BeltGeometry, clock: Callable[[], float],
                 counts_per_s: Callable[[], float], model_version: str, alarms: AlarmBoard | None = None,
                 first_command_id: int = 1, inspector: LooksLike | None = None):
        self.cfg = cfg
        self.detector = detector
        self.link = link
        self.records = records
        self.tax = taxonomy
        self.geom = geometry
        self.clock = clock
        self.counts_per_s = counts_per_s
        self.model_version = model_version
        self.alarms = alarms or AlarmBoard(clock)
        names = detector.names
        unknown = [n for n in names if n not in taxonomy.names]
        if unknown:
            raise ValueError(f"model classes {unknown} are not in the taxonomy {taxonomy.names}: "
                             "the sorting rules cannot act on them")
        self.tracker = BeltTracker(
            geometry, len(names),
            board_ids=[i for i, n in enumerate(names) if taxonomy.by_name(n).is_board],
            battery_ids=[i for i, n in enumerate(names) if taxonomy.by_name(n).is_battery],
            gate_mm=cfg.tracking.gate_mm, max_missed=cfg.tracking.max_missed_frames,
            attached_overlap=cfg.rules.attached_overlap, view_length_mm=cfg.camera.width / cfg.camera.px_per_mm)
        self.sorter = Sorter(cfg, taxonomy, names, geometry)
        self.inspector = inspector
        self._board_ids = set(self.tracker.board_ids.tolist())
        self._battery_ids = set(self.tracker.battery_ids.tolist())
        # the battery inspector's class ids, in the detector's (-1: a class the detector lacks)
        insp = inspector.inspectors.get("battery") if inspector is not None else None
        self._look_class = np.array([names.index(n) if n in names else -1 for n in insp.names]
                                    if insp is not None else [], np.int64)
        self.counters = Counters()
        self._next_command = first_command_id
        self._command_track: dict[int, int] = {}
        self.use_config(cfg)
        self.recent: list[tuple[Decision, str]] = []   # newest last, bounded: for status and HMI
        self.capture: Any = None            # station.capture.Capture when capture is on; called after each frame
        self._pending: tuple[DetectorLike, str, float] | None = None   # a validated model waiting for the next frame
        self.swaps: list[dict[str, Any]] = []

    def use_config(self, cfg: StationConfig) -> None:
        """Take changed rules/diverters (validated as a whole by the caller) from the next item on."""
        self.cfg = cfg
        self.sorter.use_config(cfg)
        self._pulse = {d.id: d.pulse_ms for d in cfg.diverters}
        self._latency = {d.id: d.latency_ms for d in cfg.diverters}

    # ---- per frame -----------------------------------------------------------------------------
    def process(self, frame: Frame, count: int | None = None) -> FrameResult:
        """Run one frame. `count` is the encoder count at capture when the frame carries none."""
        c = frame.belt_count if frame.belt_count is not None else count
        if c is None:
            raise ValueError("frame has no belt position: pass the count from the belt clock")
        if self._pending is not None:
            self._switch_detector()
        det = self.detector(frame.image)
        t = frame.t_ns / 1e9
        seen = self.tracker.update(det, c, t, frame.image.shape[1])
        if self.inspector is not None:
            self._schedule_looks(seen, frame, c)
        decisions = []
        for tr in self.tracker.due_for_decision(c, self.cfg.line.decision_line_mm):
            tr.decided = True
            decisions.append(self._act(tr, frame, c))
        for tr in self.tracker.prune(c):
            if tr.hits >= self.cfg.rules.min_views and tr.born_x_mm >= self.cfg.line.decision_line_mm:
                # a real item the detector saw only past the decision line: unsorted, on record
                tr.decided = True
                decisions.append(self._act(tr, frame, c))
            else:
                self.counters.lost_tracks += 1     # flicker: a few frames of something, never an item
        self.counters.frames += 1
        res = FrameResult(frame, det, c, seen, decisions)
        if self.capture is not None and decisions:
            self.capture.on_frame(res, {d.track_id: o for d, o in self.recent[-len(decisions):]})
        return res

    def _schedule_looks(self, seen: list[Track], frame: Frame, count: int) -> None:
        """Closer looks (vision.inspection: why) at the items in view before their decision.

        An item is looked at while it lies wholly in the image, at most `looks` times per kind,
        `spacing_mm` of belt apart: looks at the same place see the same pixels and add cost, not
        evidence. One look of each kind at a time bounds what the looks cost; the item nearest
        the decision line goes first, as it has the fewest frames left. A board gets a board look
        (is a battery on it?), an item the detector takes for a battery a battery look (what kind?).
        """
        self._apply_looks()
        ic = self.cfg.inspector
        spacing = ic.spacing_mm / self.geom.mm_per_count
        kinds = [k for k in ("board", "battery") if k in self.inspector.kinds]
        for kind in kinds:
            if self.inspector.busy(kind):
                continue
            if kind == "board":
                due = [tr for tr in seen if tr.best_class in self._board_ids and tr.looks + tr.look_pending < ic.looks
                       and (tr.last_look_count is None or abs(count - tr.last_look_count) >= spacing)]
            else:
                due = [tr for tr in seen if tr.best_class in self._battery_ids
                       and tr.battery_looks + tr.battery_look_pending < ic.battery_looks
                       and (tr.last_battery_look_count is None or abs(count - tr.last_battery_look_count) >= spacing)]
            due = [tr for tr in due if not tr.decided and tr.last_box_whole and tr.last_box is not None]
            if not due:
                continue
            tr = max(due, key=lambda t_: t_.x_at(count, self.geom))
            if kind == "board":
                tr.last_look_count = count
                tr.look_pending += 1
            else:
                tr.last_battery_look_count = count
                tr.battery_look_pending += 1
            self.inspector.submit(kind, tr.id, frame.image, tr.last_box)
        self._apply_looks()          # made inline (virtual time): they count for this frame's decisions

    def _apply_looks(self) -> None:
        for kind, tid, answer in self.inspector.take():
            tr = self.tracker.tracks.get(tid)
            if tr is None:           # left the view while its look was made
                continue
            if kind == "board":
                tr.look_pending -= 1
            else:
                tr.battery_look_pending -= 1
            if answer is None:
                code, what = (("inspector_failed", "whether a battery is on it") if kind == "board"
                              else ("battery_inspector_failed", "what kind of battery it is"))
                self.alarms.raise_(code, Severity.WARNING,
                                   f"the {kind} inspector could not look at item {tid}: the detector's own view "
                                   f"decides {what} (see the station log)", item_id=tid, params={"item": tid})
                continue
            if kind == "board":
                tr.looks += 1
                tr.look_hits += bool(answer.found)
                self.counters.board_looks += 1
            else:
                if tr.battery_look_votes is None:
                    tr.battery_look_votes = np.zeros(len(self.detector.names), np.float64)
                tr.battery_looks += 1
                if answer.class_id is not None:
                    k = self._look_class[answer.class_id]
                    if k >= 0:
                        tr.battery_look_votes[k] += answer.score
                self.counters.battery_looks += 1

    # ---- hot-swap: a validated model takes over between two frames ------------------------------
    def offer_detector(self, detector: DetectorLike, version: str) -> None:
        """Any thread: `detector` (loaded and validated elsewhere) runs from the next frame on.

        Its classes must be the running model's, in the same order: the tracks in flight carry
        votes indexed by class id, and they go on across the switch.
        """
        if tuple(detector.names) != tuple(self.detector.names):
            raise ValueError(f"model {version} detects {list(detector.names)}, the running model "
                             f"{list(self.detector.names)}: a switch would scramble the tracks' votes")
        self._pending = (detector, version, self.clock())

    def _switch_detector(self) -> None:
        det, version, offered = self._pending  # type: ignore[misc]
        self._pending = None
        old = self.model_version
        self.detector = det
        self.model_version = version
        self.swaps.append({"from": old, "to": version, "offered_s": offered, "switched_s": self.clock(),
                           "frame": self.counters.frames, "tracks_in_flight": len(self.tracker.tracks)})
        log.info("model switched %s -> %s between frames %d and %d (%d tracks in flight)", old, version,
                 self.counters.frames - 1, self.counters.frames, len(self.tracker.tracks))

    def _act(self, tr: Track, frame: Frame, frame_count: int) -> Decision:
        d = self.sorter.decide(tr)
        command_id = fire_count = None
        outcome = "manual"
        if not d.to_manual:
            assert d.diverter_id is not None and d.center_count is not None
            cps = self.counts_per_s()
            pulse = self._pulse[d.diverter_id]
            # centre the pulse on the item; the MCU compensates the actuator's latency itself
            fire_count = int(round(d.center_count - pulse / 2000.0 * cps))
            now_count = frame_count + (self.clock() - frame.t_ns / 1e9) * cps
            margin = (self.cfg.line.command_margin_ms + self._latency[d.diverter_id]) / 1000.0 * cps
            if fire_count - now_count < margin:
                outcome = "missed"
                self.counters.missed += 1
                self.alarms.raise_("missed_item", Severity.WARNING,
                                   f"item {tr.id} ({d.class_name}) could not be diverted in time: "
                                   "it goes to the end of the belt", item_id=tr.id,
                                   params={"item": tr.id, "class": d.class_name})
                log.warning("item %d: command for diverter %d too late (%.0f counts to go, need %.0f): missed",
                            tr.id, d.diverter_id, fire_count - now_count, margin)
            else:
                command_id = self._next_command
                self._next_command += 1
                self._command_track[command_id] = tr.id
                self.link.fire_at(command_id, d.diverter_id, fire_count, pulse)
                self.counters.sent += 1
                outcome = "sent"
                log.debug("item %d: %s -> bin %d, diverter %d at count %d (command %d)", tr.id, d.class_name,
                          d.bin, d.diverter_id, fire_count, command_id)
        else:
            log.debug("item %d: %s -> manual (%s)", tr.id, d.class_name, d.reason.value)
        self.counters.decided += 1
        self.counters.per_bin[d.bin if outcome != "missed" else MANUAL_BIN] += 1
        self.counters.per_class[d.class_name] += 1
        self.counters.reasons[d.reason.value] += 1
        self.records.item_decided(ItemRecord(
            track_id=tr.id, first_seen_s=tr.first_t, decided_s=self.clock(), class_name=d.class_name,
            confidence=round(d.confidence, 4), votes=d.votes, views=tr.hits, bin=d.bin,
            diverter_id=d.diverter_id, reason=d.reason.value, command_id=command_id, fire_count=fire_count,
            outcome=outcome, model_version=self.model_version, u_mm=round(tr.u_mm, 2), y_mm=round(tr.y_mm, 2),
            length_mm=round(tr.length_mm, 1), width_mm=round(tr.width_mm, 1)))
        self.recent.append((d, outcome))
        del self.recent[:-50]
        return d

    # ---- what the link says --------------------------------------------------------------------
    def handle_link_events(self) -> int:
        from firmware_bridge.events import (
            AckEvent, CommandTimeoutEvent, FaultEvent, FiredEvent, LinkErrorEvent, LinkRestoredEvent, NakEvent,
            ResetEvent,
        )
        events = self.link.poll_events()
        now = self.clock()
        for ev in events:
            if isinstance(ev, AckEvent):
                if ev.command_id in self._command_track:
                    self.counters.acked += 1
                    self.records.item_outcome(ev.command_id, "acked", now)
            elif isinstance(ev, FiredEvent):
                self.counters.fired += 1
                self.records.item_outcome(ev.command_id, "fired", now, ev.actual_count)
            elif isinstance(ev, NakEvent):
                reason = ev.reason.name if hasattr(ev.reason, "name") else str(ev.reason)
                self.counters.naks[reason] += 1
                self.records.item_outcome(ev.command_id, f"nak:{reason}", now)
                tid = self._command_track.get(ev.command_id)
                if reason == "LATE":
                    self.counters.missed += 1
                    self.alarms.raise_("missed_item", Severity.WARNING,
                                       f"item {tid}: the MCU refused a late command; it goes to the end of the belt",
                                       item_id=tid, detail="missed_item.refused_late", params={"item": tid})
                else:
                    self.alarms.raise_("diverter_fault", Severity.WARNING,
                                       f"item {tid}: MCU refused command {ev.command_id} ({reason})", item_id=tid,
                                       detail="diverter_fault.refused",
                                       params={"item": tid, "command": ev.command_id, "reason": reason})
            elif isinstance(ev, CommandTimeoutEvent):
                tid = self._command_track.get(ev.command_id)
                self.records.item_outcome(ev.command_id, "timeout", now)
                self.alarms.raise_("link_lost", Severity.FAULT,
                                   f"item {tid}: command {ev.command_id} unanswered after {ev.attempts} tries",
                                   item_id=tid, detail="link_lost.unanswered",
                                   params={"item": tid, "command": ev.command_id, "tries": ev.attempts})
            elif isinstance(ev, ResetEvent):
                for cid in ev.lost_command_ids:
                    self.records.item_outcome(cid, "lost_in_reset", now)
                self.alarms.raise_("mcu_reset", Severity.FAULT,
                                   f"the diverter controller restarted (boot {ev.boot_id:#x}); "
                                   f"{len(ev.lost_command_ids)} queued commands lost, configuration re-sent",
                                   params={"boot": f"{ev.boot_id:#x}", "lost": len(ev.lost_command_ids)})
            elif isinstance(ev, FaultEvent):
                self.alarms.raise_("diverter_fault", Severity.FAULT, f"MCU fault {ev.code.name} ({ev.detail})",
                                   params={"fault": ev.code.name, "info": ev.detail})
            elif isinstance(ev, LinkErrorEvent):
                self.alarms.raise_("link_lost", Severity.FAULT, f"diverter link: {ev.message}",
                                   params={"error": ev.message})
            elif isinstance(ev, LinkRestoredEvent):
                # a restart meanwhile is the ResetEvent's own mcu_reset alarm (with the commands it lost)
                self.alarms.raise_("link_restored", Severity.INFO,
                                   f"diverter link restored after {ev.down_s:.1f} s (reconnect {ev.reconnects})",
                                   params={"down_s": f"{ev.down_s:.1f}", "reconnects": ev.reconnects})
        return len(events)
