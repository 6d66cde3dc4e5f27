"""The simulated line's true camera: a pinhole with lens distortion, posed over the belt plane.

Why it exists: calibration tools are only trustworthy if they recover a truth they were never told.
The simulated camera renders through this model (when `sim.true_camera` is set), and the tests compare
what `kozan calibrate` measures with it. Unset, the camera is the ideal straight-down one at
`camera.px_per_mm` and nothing is remapped.
"""
from __future__ import annotations

import cv2
import numpy as np

from station.config import SimCameraTruth


class TrueCamera:
    """Projection between belt-plane millimetres and image pixels, both ways, for one camera."""

    def __init__(self, truth: SimCameraTruth, width: int, height: int):
        self.truth = truth
        self.W, self.H = width, height
        self.K = np.array([[truth.fx, 0, truth.cx], [0, truth.fy, truth.cy], [0, 0, 1]], np.float64)
        self.dist = np.asarray(truth.dist, np.float64)
        self.rvec = np.asarray(truth.rvec, np.float64).reshape(3, 1)
        self.tvec = np.asarray(truth.tvec, np.float64).reshape(3, 1)
        R, _ = cv2.Rodrigues(self.rvec)
        # belt plane (x, y, 0) -> normalised camera coordinates: columns r1, r2, t
        self.plane = np.c_[R[:, 0], R[:, 1], self.tvec[:, 0]]
        self._plane_inv = np.linalg.inv(self.plane)
        self._norm_grid: np.ndarray | None = None

    @staticmethod
    def straight_down(px_per_mm: float, width: int, height: int, height_mm: float = 1200.0,
                      dist: list[float] | None = None, focal_scale: float = 1.0,
                      rvec: list[float] | None = None, shift_mm: tuple[float, float] = (0.0, 0.0)) -> SimCameraTruth:
        """A truth model that, undistorted and unscaled, equals the ideal camera (pixel = mm * px_per_mm).

        `focal_scale`, `rvec`, `shift_mm` and `dist` then mis-set it in known ways."""
        f = px_per_mm * height_mm * focal_scale
        cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
        # pixel (cx, cy) must see belt point (cx, cy) / px_per_mm: x + tx = (u - cx) * h / f = 0
        tx = -cx / px_per_mm + shift_mm[0]
        ty = -cy / px_per_mm + shift_mm[1]
        return SimCameraTruth(fx=f, fy=f, cx=cx, cy=cy, dist=list(dist or [0.0] * 5),
                              rvec=list(rvec or [0.0, 0.0, 0.0]), tvec=[tx, ty, height_mm])

    def belt_to_px(self, xy_mm: np.ndarray) -> np.ndarray:
        """(N, 2) belt mm -> (N, 2) distorted image pixels."""
        p = np.asarray(xy_mm, np.float64).reshape(-1, 2)
        obj = np.c_[p, np.zeros(len(p))]
        img, _ = cv2.projectPoints(obj, self.rvec, self.tvec, self.K, self.dist)
        return img.reshape(-1, 2)

    def _undistort(self, px: np.ndarray) -> np.ndarray:
        crit = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)
        und = cv2.undistortPoints(np.asarray(px, np.float64).reshape(-1, 1, 2), self.K, self.dist,
                                  R=np.eye(3), P=np.eye(3), criteria=crit)
        return und.reshape(-1, 2)

    def norm_to_belt(self, norm: np.ndarray) -> np.ndarray:
        """(N, 2) undistorted normalised camera coordinates -> (N, 2) belt mm."""
        h = np.c_[norm, np.ones(len(norm))] @ self._plane_inv.T
        return h[:, :2] / h[:, 2:3]

    def px_to_belt(self, px: np.ndarray) -> np.ndarray:
        """(N, 2) image pixels -> (N, 2) belt mm (where each pixel's ray meets the belt)."""
        return self.norm_to_belt(self._undistort(px))

    def norm_grid(self) -> np.ndarray:
        """(H*W, 2) undistorted normalised coordinates of every pixel (computed once per camera)."""
        if self._norm_grid is None:
            u, v = np.meshgrid(np.arange(self.W, dtype=np.float64), np.arange(self.H, dtype=np.float64))
            self._norm_grid = self._undistort(np.c_[u.ravel(), v.ravel()])
        return self._norm_grid

    def canvas_maps(self, px_per_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """cv2.remap maps that turn the ideal canvas (pixel = belt mm * px_per_mm) into this camera's image."""
        xy = self.norm_to_belt(self.norm_grid()) * px_per_mm
        return (xy[:, 0].reshape(self.H, self.W).astype(np.float32),
                xy[:, 1].reshape(self.H, self.W).astype(np.float32))

    def plane_maps(self, plane_to_norm: np.ndarray, src_px_per_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """Remap maps for a planar target: `plane_to_norm` (3x3) takes target mm to normalised camera
        coordinates; the source image is the target drawn at `src_px_per_mm`."""
        inv = np.linalg.inv(plane_to_norm)
        g = self.norm_grid()
        h = np.c_[g, np.ones(len(g))] @ inv.T
        w = h[:, 2:3]
        with np.errstate(divide="ignore", invalid="ignore"):
            xy = np.where(w > 1e-9, h[:, :2] / w, -1e6) * src_px_per_mm
        return (xy[:, 0].reshape(self.H, self.W).astype(np.float32),
                xy[:, 1].reshape(self.H, self.W).astype(np.float32))
