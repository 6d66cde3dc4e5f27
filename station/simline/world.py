"""The simulated line's physical world: a belt, the items on it, and where each one ends up.

Ground truth lives here and only here. The station sees the world through the simulated camera
and acts on it through the firmware simulator, whose outputs arrive at `actuate`; the world then
judges each actuator pulse against where the items really were, so every run yields purity and
recovery per bin without trusting anything the station believes.

Belt coordinates: x is mm downstream of the camera view's upstream edge, y mm across the belt.
An item's belt-fixed coordinate `u` gives its centre at `x = u + travel(t)`.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field

import numpy as np

from station.clock import Clock
from station.config import MANUAL_BIN, StationConfig
from vision.render.items import DISTRACTORS, ItemSpec, Sprite, draw_item, sample_item
from vision.taxonomy import load_taxonomy

log = logging.getLogger(__name__)


@dataclass
class SimItem:
    id: int
    spec: ItemSpec
    expected_bin: int
    u_mm: float                      # centre of the sprite canvas, belt-fixed
    y_mm: float
    box_mm: tuple[float, float, float, float]   # tight box relative to the canvas centre, mm
    sprite: Sprite | None = None
    bin: int | None = None           # where it ended: None while on the belt
    fire_error_mm: float | None = None
    hit_by: list[int] = field(default_factory=list)

    @property
    def truth(self) -> str:
        """Class name, 'X+battery' for a board carrying a battery, or the distractor kind."""
        return self.spec.kind + ("+battery" if self.spec.attached is not None else "")

    @property
    def center_off_mm(self) -> float:
        return (self.box_mm[0] + self.box_mm[2]) / 2

    @property
    def length_mm(self) -> float:
        return self.box_mm[2] - self.box_mm[0]


@dataclass
class Actuation:
    diverter: int
    on_count: int
    pulse_ms: float
    command_id: int
    start_mm: float = 0.0            # belt travel when the jet really starts acting
    end_mm: float = 0.0


class BeltWorld:
    """Belt kinematics, item supply, and the judge. Implements the firmware simulator's
    `McuEnvironment` (time, encoder, actuator outputs)."""

    HIT_CORE = 0.35  # a pulse diverts an item if it meets the central ±35 % of its length

    def __init__(self, cfg: StationConfig, clock: Clock, n_items: int | None = None, seed: int | None = None):
        self.cfg = cfg
        self.clock = clock
        self.t0 = clock.now()
        self.speed = cfg.line.belt_speed_mm_s
        self.mpc = cfg.sim.true_mm_per_count or cfg.line.mm_per_count   # the encoder's true scale
        self.ppm = cfg.camera.px_per_mm
        self.view_mm = cfg.camera.width / self.ppm
        self.n_items = n_items
        self.rng = np.random.default_rng(cfg.sim.seed if seed is None else seed)
        self.tax = load_taxonomy()
        mix = cfg.sim.class_mix
        self._kinds = list(mix)
        w = np.asarray([mix[k] for k in self._kinds], float)
        self._p = w / w.sum()
        self.items: list[SimItem] = []       # every item ever spawned, in order
        self._on_belt: list[SimItem] = []
        self._next_u = -40.0                 # upstream edge of the next item's slot, belt-fixed
        self._lock = threading.Lock()
        self._actuations: list[Actuation] = []
        self._latency_s = {d.id: cfg.sim.actuator_latency_ms.get(d.id, d.latency_ms) / 1000 for d in cfg.diverters}
        self._div_pos = {d.id: cfg.sim.true_diverter_position_mm.get(d.id, d.position_mm) for d in cfg.diverters}
        self._div_bin = {d.id: d.bin for d in cfg.diverters}
        self.spawned = 0

    # ---- McuEnvironment --------------------------------------------------------------------
    def travel_mm(self, t: float | None = None) -> float:
        t = self.clock.now() if t is None else t
        return (t - self.t0) * self.speed

    def mcu_time_us(self) -> int:
        return int(round((self.clock.now() - self.t0) * 1e6))

    def encoder_count(self) -> int:
        return int(math.floor(self.travel_mm() / self.mpc + 1e-9))

    def actuate(self, diverter: int, on_count: int, pulse_ms: float, command_id: int) -> None:
        start = on_count * self.mpc + self._latency_s.get(diverter, 0.0) * self.speed
        a = Actuation(diverter, on_count, pulse_ms, command_id, start, start + pulse_ms / 1000 * self.speed)
        with self._lock:
            self._actuations.append(a)

    # ---- item supply -----------------------------------------------------------------------
    def _spawn_one(self) -> SimItem:
        rng = self.rng
        s = self.cfg.sim
        if rng.random() < s.distractor_share:
            kind = str(rng.choice(DISTRACTORS))
        else:
            kind = str(rng.choice(self._kinds, p=self._p))
        spec = sample_item(kind, rng, attach_battery_p=s.board_battery_share)
        sprite = draw_item(spec, self.ppm)
        h, w = sprite.alpha.shape
        bx0, by0, bx1, by1 = sprite.box
        box_mm = ((bx0 - w / 2) / self.ppm, (by0 - h / 2) / self.ppm, (bx1 - w / 2) / self.ppm, (by1 - h / 2) / self.ppm)
        length = box_mm[2] - box_mm[0]
        width = box_mm[3] - box_mm[1]
        # arrival: Poisson at the configured rate, but singulated (never closer than min_gap)
        gap = max(s.min_gap_mm, float(rng.exponential(self.speed * 60.0 / s.items_per_min)) - length)
        front = self._next_u - gap                      # downstream edge of this item
        u = front - box_mm[2]                           # canvas centre so that the box's front is at `front`
        self._next_u = u + box_mm[0]                    # its upstream edge
        margin = 4.0
        lo = -box_mm[1] + margin
        hi = self.cfg.line.belt_width_mm - box_mm[3] - margin
        y = float(rng.uniform(lo, hi)) if hi > lo else self.cfg.line.belt_width_mm / 2
        if spec.kind in DISTRACTORS or spec.attached is not None:
            expected = MANUAL_BIN
        else:
            expected = self.cfg.rules.class_to_bin.get(spec.kind, MANUAL_BIN)
        item = SimItem(len(self.items) + 1, spec, expected, u, y, box_mm, sprite)
        self.items.append(item)
        self._on_belt.append(item)
        self.spawned += 1
        log.debug("item %d spawned: %s at u=%.1f mm, %.0fx%.0f mm", item.id, item.truth, u, length, width)
        return item

    def supply(self) -> None:
        """Keep the belt upstream of the view stocked (lazily, so memory stays bounded)."""
        travel = self.travel_mm()
        while (self.n_items is None or self.spawned < self.n_items) and self._next_u + travel > -1500.0:
            self._spawn_one()

    def visible(self, travel: float) -> list[SimItem]:
        out = []
        for it in self._on_belt:
            x = it.u_mm + travel
            if x + it.box_mm[2] >= -5 and x + it.box_mm[0] <= self.view_mm + 5:
                out.append(it)
        return out

    # ---- the judge -------------------------------------------------------------------------
    def settle(self, final: bool = False) -> None:
        """Apply actuator pulses in belt order and finalise items that have left the belt.

        Pulses are judged once the belt has moved past them (plus a margin for a firmware thread
        that reports late); `final=True` judges everything (end of a run).
        """
        travel = self.travel_mm()
        horizon = math.inf if final else travel - 400.0
        with self._lock:
            due = [a for a in self._actuations if a.end_mm <= horizon]
            self._actuations = [a for a in self._actuations if a.end_mm > horizon]
        for a in sorted(due, key=lambda a: a.start_mm):
            D = self._div_pos.get(a.diverter)
            if D is None:
                log.error("actuation on unknown diverter %d (command %d)", a.diverter, a.command_id)
                continue
            for it in self._on_belt:
                if it.bin is not None:
                    continue
                c0 = it.u_mm + it.center_off_mm + a.start_mm   # centre x when the pulse starts
                c1 = it.u_mm + it.center_off_mm + a.end_mm
                core = self.HIT_CORE * it.length_mm
                if c0 - core <= D and c1 + core >= D and c1 >= D - core and c0 <= D + core:
                    it.bin = self._div_bin[a.diverter]
                    it.fire_error_mm = (c0 + c1) / 2 - D
                    it.hit_by.append(a.command_id)
                    log.debug("item %d (%s) diverted to bin %d by command %d, error %.1f mm",
                              it.id, it.truth, it.bin, a.command_id, it.fire_error_mm)
        end = self.cfg.line.end_of_belt_mm
        keep = []
        for it in self._on_belt:
            x_back = it.u_mm + it.box_mm[0] + travel
            if it.bin is None and (final or x_back > end + 400.0):
                it.bin = MANUAL_BIN
            if it.bin is not None:        # diverted into a bin, or fell off the end: off the belt
                it.sprite = None
                continue
            if x_back > self.view_mm + 50:
                it.sprite = None          # free the pixels once it cannot be seen again
            keep.append(it)
        self._on_belt = keep

    @property
    def done(self) -> bool:
        return self.n_items is not None and self.spawned >= self.n_items and not self._on_belt

    def all_items_past(self) -> bool:
        """Every item of a bounded run has travelled past the end of the belt (plus margin)."""
        if self.n_items is None or self.spawned < self.n_items:
            return False
        travel = self.travel_mm()
        return all(it.u_mm + it.box_mm[0] + travel > self.cfg.line.end_of_belt_mm + 450.0 for it in self._on_belt)
