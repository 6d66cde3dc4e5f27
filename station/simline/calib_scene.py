"""The simulated line, seen by the calibration tools: targets through the true camera, a puck riding
the belt past light gates, and diverters fired over the real serial link.

Everything the tools are supposed to measure comes from the configuration's truth (`sim.true_camera`,
`sim.true_mm_per_count`, `sim.true_diverter_position_mm`, `sim.actuator_latency_ms`) and is used here
only to make pixels and sensor readings; the tools never see it, so the tests can check they recover it.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np

from calibration.targets import TargetSpec
from station.clock import VirtualClock
from station.config import StationConfig
from station.simline.camera_model import TrueCamera

log = logging.getLogger(__name__)

SRC_PX_PER_MM = 6.0       # the target is drawn this finely before it is re-imaged


def true_camera(cfg: StationConfig) -> TrueCamera:
    """The simulated camera's model: the configured truth, or the ideal straight-down camera."""
    truth = cfg.sim.true_camera or TrueCamera.straight_down(cfg.camera.px_per_mm, cfg.camera.width, cfg.camera.height)
    return TrueCamera(truth, cfg.camera.width, cfg.camera.height)


@functools.lru_cache(maxsize=8)
def _target_source(spec: TargetSpec, sigma: float) -> np.ndarray:
    """The target drawn at SRC_PX_PER_MM and pre-filtered (drawn once per process and target)."""
    img = cv2.GaussianBlur(spec.render(SRC_PX_PER_MM, margin_mm=0.0), (0, 0), sigma)
    img.setflags(write=False)
    return img


def _rot(rx: float, ry: float, rz: float) -> np.ndarray:
    R, _ = cv2.Rodrigues(np.array([rx, ry, rz], np.float64))
    return R


class CalibScene:
    """Renders a planar target through the true camera, in any pose or lying on the belt."""

    def __init__(self, cfg: StationConfig, spec: TargetSpec, seed: int = 0):
        self.cfg = cfg
        self.spec = spec
        self.cam = true_camera(cfg)
        self.rng = np.random.default_rng(seed)
        # pre-filter so that re-imaging at ~2 px/mm does not alias the squares
        sigma = max(0.5, SRC_PX_PER_MM / (2.0 * cfg.camera.px_per_mm))
        self._src = _target_source(spec, sigma)
        self._bg = 90

    def _image(self, plane_to_norm: np.ndarray) -> np.ndarray:
        img = np.full((self.cam.H, self.cam.W), self._bg, np.uint8)
        # only the target's footprint is re-imaged: everything else is the plain background
        roi = self.cam.plane_footprint(plane_to_norm, *self.spec.size_mm)
        if roi is not None:
            x0, y0, x1, y1 = roi
            mx, my = self.cam.plane_maps(plane_to_norm, SRC_PX_PER_MM, roi)
            mx -= 0.5   # source pixel i covers target mm [i, i+1) / SRC_PX_PER_MM
            my -= 0.5
            img[y0:y1, x0:x1] = cv2.remap(self._src, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                          borderValue=self._bg)
        out = img.astype(np.float32)
        out *= 0.8     # contrast 0.8, offset 20, sensor noise sigma 2 grey levels
        out += 20.0
        out += 2.0 * self.rng.standard_normal(img.shape, dtype=np.float32)
        img = np.clip(out, 0, 255, out=out).astype(np.uint8)
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)

    def render_pose(self, R: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The target with its plane at camera pose (R, t): target mm (X, Y, 0) -> R @ X + t."""
        return self._image(np.c_[R[:, 0], R[:, 1], np.asarray(t, float).reshape(3)])

    def render_on_belt(self, x0_mm: float, y0_mm: float, angle_rad: float = 0.0) -> np.ndarray:
        """The target lying flat on the belt, its origin corner at belt (x0, y0), rotated by angle."""
        c, s = math.cos(angle_rad), math.sin(angle_rad)
        A = np.array([[c, -s, x0_mm], [s, c, y0_mm], [0, 0, 1.0]])   # target mm -> belt mm
        return self._image(self.cam.plane @ A)

    def camera_views(self, n: int = 16) -> Iterator[np.ndarray]:
        """Hand-held target views of the kind a technician takes: tilted, at several distances, and
        walked across the whole image (corners included) so distortion is well sampled."""
        K = self.cam.K
        W, H = self.cam.W, self.cam.H
        w_mm, h_mm = self.spec.size_mm
        z0 = float(self.cam.tvec[2, 0])
        grid = [(u, v) for v in (0.22, 0.5, 0.78) for u in (0.2, 0.5, 0.8)]
        for k in range(n):
            u, v = grid[k % len(grid)]
            u = (u + self.rng.uniform(-0.04, 0.04)) * W
            v = (v + self.rng.uniform(-0.04, 0.04)) * H
            z = z0 * self.rng.uniform(0.75, 1.1)
            R = _rot(self.rng.uniform(-0.45, 0.45), self.rng.uniform(-0.45, 0.45), self.rng.uniform(-0.3, 0.3))
            centre = np.linalg.inv(K) @ np.array([u, v, 1.0]) * z
            t = centre - R @ np.array([w_mm / 2, h_mm / 2, 0.0])
            yield self.render_pose(R, t)


@dataclass
class FireObservation:
    fired_count: int        # the MCU's report: count at which it switched the output (FiredEvent)
    action_count: int       # the actuator sensor's report: count at which the paddle really moved
    counts_per_s: float     # belt speed from the encoder reports (belt clock)


class SimDiverterRig:
    """Diverter calibration hardware on the simulated line: a puck (a small target) riding the belt,
    a light gate at each diverter reporting the encoder count when the puck crosses it and when the
    actuator moves, and the firmware simulator on a real pseudo-terminal answering `fire_now`."""

    def __init__(self, cfg: StationConfig, puck: TargetSpec, seed: int = 0, gate_jitter_counts: int = 2):
        from station.assembly import open_link
        from station.simline.world import BeltWorld

        # virtual time: the host may stall for wall-clock seconds (a busy machine) while no belt time
        # passes; the MCU watchdog runs on wall time, so here it only catches a dead host (as in run_fast)
        cfg = cfg.model_copy(deep=True)
        cfg.link.watchdog_ms = max(cfg.link.watchdog_ms, 5000)
        self.cfg = cfg
        self.puck = puck
        self.clock = VirtualClock(0.0)
        self.world = BeltWorld(cfg, self.clock, n_items=0, seed=seed)
        self.scene = CalibScene(cfg, puck, seed=seed)
        self.rng = np.random.default_rng(seed + 17)
        self.jitter = gate_jitter_counts
        self._actions: dict[int, list[float]] = {}
        real_actuate = self.world.actuate

        def actuate(diverter: int, on_count: int, pulse_ms: float, command_id: int) -> None:
            real_actuate(diverter, on_count, pulse_ms, command_id)
            lat = self.world._latency_s.get(diverter, 0.0)
            self._actions.setdefault(command_id, []).append(self.clock.now() + lat)

        self.world.actuate = actuate  # type: ignore[method-assign]
        self.bundle = open_link(cfg, self.clock, environment=self.world, watchdog_clock=time.monotonic)
        self._cmd = 0
        self._t = 0.0
        self.period = 1.0 / cfg.camera.fps
        self._step(0.2, tick=0.05)

    @property
    def diverter_ids(self) -> list[int]:
        return [d.id for d in self.cfg.diverters if d.enabled]

    def close(self) -> None:
        self.bundle.close()

    def _step(self, dt: float, tick: float = 0.005) -> None:
        """Advance virtual time by `dt`, letting the MCU run a service pass every `tick` seconds.

        The belt is analytic in time, so coarse ticks lose nothing where nothing is being fired."""
        end = self._t + dt
        while self._t < end - 1e-12:
            self._t = min(end, self._t + tick)
            self.clock.advance_to(self._t)
            if not self.bundle.firmware.sync(timeout=5.0):
                raise RuntimeError("firmware simulator stopped answering")

    def _count_at_mm(self, travel_mm: float) -> int:
        return int(math.floor(travel_mm / self.world.mpc + 1e-9))

    def puck_pass(self, diverter: int, every: int = 6) -> tuple[list[tuple[np.ndarray, int]], int]:
        """Lay the puck on the belt upstream of the camera; return camera frames (image, count) of it
        crossing the view and the count at which the diverter's light gate saw its centre."""
        w = self.world
        travel0 = w.travel_mm(self.clock.now())
        y0 = self.rng.uniform(60.0, self.cfg.line.belt_width_mm - 60.0 - self.puck.size_mm[1])
        # belt-fixed position of the puck's origin corner: just upstream of the view
        u0 = -self.puck.size_mm[0] - 20.0 - travel0 + self.rng.uniform(0.0, 30.0)
        frames = []
        view_mm = self.cfg.camera.width / self.cfg.camera.px_per_mm
        k = 0
        while u0 + w.travel_mm(self.clock.now()) < view_mm + 10.0:
            self._step(self.period, tick=self.period)
            k += 1
            if k % every:
                continue      # the tools need a handful of sharp views, not every frame
            travel = w.travel_mm(self.clock.now())
            frames.append((self.scene.render_on_belt(u0 + travel, y0), self._count_at_mm(travel)))
        centre_u = u0 + self.puck.size_mm[0] / 2
        gate_travel = w._div_pos[diverter] - centre_u
        gate = self._count_at_mm(gate_travel) + int(self.rng.integers(-self.jitter, self.jitter + 1))
        return frames, gate

    def fire_and_observe(self, diverter: int, pulse_ms: float = 40.0) -> FireObservation:
        """Fire the diverter now over the link; the gate at the actuator reports when it moved."""
        from firmware_bridge import FiredEvent

        link = self.bundle.link
        self._step(self.rng.uniform(0.05, 0.15), tick=0.05)
        self._cmd += 1
        cmd = self._cmd
        c0, t0 = self.world.encoder_count(), self.clock.now()
        link.fire_now(cmd, diverter, pulse_ms)
        fired = None
        for _ in range(400):
            self._step(0.005)
            link.wait_settled(timeout=5.0)
            for ev in link.poll_events():
                if isinstance(ev, FiredEvent) and ev.command_id == cmd:
                    fired = ev
            if fired is not None and cmd in self._actions:
                break
        if fired is None:
            raise RuntimeError(f"diverter {diverter}: the MCU never reported firing command {cmd}")
        self._step(0.6, tick=0.05)   # let the pulse end before the next firing
        t_action = self._actions[cmd][0]
        action = self._count_at_mm(self.world.travel_mm(t_action)) + int(self.rng.integers(-self.jitter, self.jitter + 1))
        c1, t1 = self.world.encoder_count(), self.clock.now()
        return FireObservation(fired.actual_count, action, (c1 - c0) / (t1 - t0))
