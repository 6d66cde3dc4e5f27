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
from typing import Iterator

import cv2
import numpy as np

from calibration.targets import TargetSpec
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
