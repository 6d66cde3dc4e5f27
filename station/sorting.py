"""Sorting rules: one decision per item at the decision line.

Rules map a class to a bin; safety rules come first and only ever send an item to the manual
path (end of belt), never into a bin: when in doubt, a person looks at it. The reasons are
recorded with the item so an operator can see why it was not sorted.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np

from calibration.geometry import BeltGeometry
from station.config import MANUAL_BIN, StationConfig
from vision.taxonomy import Taxonomy
from vision.tracking import Track

log = logging.getLogger(__name__)


class Reason(str, enum.Enum):
    RULE = "rule"                          # sorted by its class rule
    NO_RULE = "no_rule"                    # class has no bin: manual by design
    LOW_CONFIDENCE = "low_confidence"
    FEW_VIEWS = "few_views"
    BATTERY_ON_BOARD = "battery_on_board"
    BATTERY_LIKE = "battery_like"          # a board whose votes look partly like a battery
    LI_ION_LIKE = "li_ion_like"            # bound for a non-Li-ion bin, but its votes look partly Li-ion
    LATE_DETECTION = "late_detection"      # first seen past the decision line
    DIVERTER_DISABLED = "diverter_disabled"
    OPERATOR_OVERRIDE = "operator_override"


@dataclass(frozen=True)
class Decision:
    track_id: int
    class_name: str
    confidence: float
    votes: dict[str, float]
    bin: int
    diverter_id: int | None
    reason: Reason
    center_count: float | None = None      # encoder count when the item centre reaches its diverter

    @property
    def to_manual(self) -> bool:
        return self.bin == MANUAL_BIN


class Sorter:
    def __init__(self, cfg: StationConfig, taxonomy: Taxonomy, model_names: tuple[str, ...], geometry: BeltGeometry):
        self.cfg = cfg
        self.tax = taxonomy
        self.names = model_names
        self.geom = geometry
        self._battery_ids = [i for i, n in enumerate(model_names) if taxonomy.by_name(n).is_battery]
        self._li_ion_ids = [i for i, n in enumerate(model_names) if taxonomy.by_name(n).is_li_ion]
        self.manual_next = 0  # operator: "send the next N items to manual"
        self.use_config(cfg)

    def use_config(self, cfg: StationConfig) -> None:
        """Rules and diverters changed on a running station apply from the next decision."""
        self.cfg = cfg
        self._diverter_for_bin = {d.bin: d for d in cfg.diverters if d.enabled}
        self._bin_of_id = np.array([cfg.rules.class_to_bin.get(n, MANUAL_BIN) for n in self.names], np.int64)

    def votes(self, tr: Track) -> np.ndarray:
        """The scores an item is sorted on: its views' votes, blended with its close looks.

        A battery look (vision.inspection.BatteryInspector) reads the item at three times the
        detector's resolution, where an 18650 and an AA no longer differ by a few pixels. The
        looks' mean score per class stands in for `inspector.battery_weight` of every view's
        vote, so the rules below (bin confidence, evidence, shares) read the blend unchanged. A
        look that found no battery adds nothing: it lowers the blend, towards manual.
        """
        w = self.cfg.inspector.battery_weight
        if tr.battery_looks == 0 or tr.battery_look_votes is None or w <= 0:
            return tr.votes
        return (1.0 - w) * tr.votes + w * tr.battery_look_votes * (max(tr.hits, 1) / tr.battery_looks)

    def _bin_vote(self, votes: np.ndarray, hits: int) -> tuple[str, float, float, float]:
        """The class to act on, the confidence that its *bin* is right, that bin's evidence and share.

        The line sorts into bins, not classes: an alkaline cell scored 0.35 alkaline and 0.3
        NiMH over its views is, with 0.65, certainly an "other batteries" item, while the
        class-level mean (0.35) would send it to manual. So votes are summed per bin, the
        winning bin's mean score over the item's views is the confidence, and the class
        recorded is the strongest class inside that bin. The evidence is the bin's score sum
        (about "how many sure views"), the share its part of all the item's votes.
        """
        total = float(votes.sum())
        if total <= 0:
            return "unknown", 0.0, 0.0, 0.0
        per_bin = np.bincount(self._bin_of_id, weights=votes)
        b = int(np.argmax(per_bin))
        in_bin = np.where(self._bin_of_id == b, votes, -1.0)
        return (self.names[int(np.argmax(in_bin))], float(per_bin[b] / max(hits, 1)), float(per_bin[b]),
                float(per_bin[b] / total))

    @staticmethod
    def _share(votes: np.ndarray, class_ids: list[int]) -> float:
        tot = float(votes.sum())
        return float(votes[class_ids].sum() / tot) if tot > 0 else 0.0

    def _faint_but_consistent(self, conf: float, evidence: float, share: float) -> bool:
        """An item the detector scores low in every view, but in many views and for one bin.

        The mean score alone cannot tell a faint cell seen in 30 of 30 frames, its votes all for
        "other batteries", from a plastic fragment flickering as a cell in 6 frames: both mean
        ~0.3. Summed over the views they differ (measured, seed 7: faint cells 8–13, flickering
        distractors 1–7), and a split between bins (a NiMH cell half read as Li-ion) still goes
        to manual through the share.
        """
        r = self.cfg.rules
        return conf >= r.faint_min_confidence and evidence >= r.faint_min_evidence and share >= r.faint_min_share

    def _battery_on_board(self, tr: Track) -> bool:
        """With the board inspector on, its closer looks decide: from the detector's far view a
        button cell is a few pixels and a capacitor looks like one (vision.inspection). A board it
        never saw whole (longer than the view) falls back to the detector's view."""
        if tr.looks > 0:
            return tr.look_hits >= self.cfg.inspector.min_hits
        return tr.attached_votes >= max(1, tr.hits // 4)

    def decide(self, tr: Track) -> Decision:
        r = self.cfg.rules
        blend = self.votes(tr)
        votes = {self.names[i]: round(float(v), 3) for i, v in enumerate(blend) if v > 0}
        best, conf, evidence, share = self._bin_vote(blend, tr.hits)
        info = self.tax.by_name(best) if best != "unknown" else None

        def manual(reason: Reason) -> Decision:
            return Decision(tr.id, best, conf, votes, MANUAL_BIN, None, reason)

        if tr.born_x_mm >= self.cfg.line.decision_line_mm:
            return manual(Reason.LATE_DETECTION)
        if self.manual_next > 0:
            self.manual_next -= 1
            return manual(Reason.OPERATOR_OVERRIDE)
        if tr.hits < r.min_views:
            return manual(Reason.FEW_VIEWS)
        if info is not None and info.is_board:
            if self._battery_on_board(tr):
                return manual(Reason.BATTERY_ON_BOARD)
            if self._share(blend, self._battery_ids) >= r.battery_guard_share:
                return manual(Reason.BATTERY_LIKE)
        # Li-ion in any other bin is a fire in the next machine: the same guard as for boards
        if info is not None and not info.is_li_ion and self._share(blend, self._li_ion_ids) >= r.li_ion_guard_share:
            return manual(Reason.LI_ION_LIKE)
        if conf < r.min_confidence and not self._faint_but_consistent(conf, evidence, share):
            return manual(Reason.LOW_CONFIDENCE)
        b = r.class_to_bin.get(best, MANUAL_BIN)
        if b == MANUAL_BIN:
            return manual(Reason.NO_RULE)
        div = self._diverter_for_bin.get(b)
        if div is None:
            return manual(Reason.DIVERTER_DISABLED)
        center_count = self.geom.count_at_travel(div.position_mm - tr.u_mm)
        return Decision(tr.id, best, conf, votes, b, div.id, Reason.RULE, center_count)
