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

GRID_STEP_PX = 8     # the lens is undistorted exactly on this pixel lattice and interpolated in between
_GRIDS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}   # per lens and image size: computed once per process


def _interp_matrix(n: int, nodes: np.ndarray) -> np.ndarray:
    """(n, len(nodes)) weights that linearly interpolate values at integer `nodes` onto 0..n-1."""
    eye = np.eye(len(nodes))
    x = np.arange(n, dtype=np.float64)
    return np.stack([np.interp(x, nodes, eye[:, j]) for j in range(len(nodes))], axis=1)


def _lattice(n: int, step: int) -> np.ndarray:
    nodes = np.arange(0, n, step, dtype=np.float64)
    return nodes if nodes[-1] == n - 1 else np.r_[nodes, n - 1.0]


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
        self._key = (self.K.tobytes(), self.dist.tobytes(), width, height)

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

    def norm_grids(self) -> tuple[np.ndarray, np.ndarray]:
        """Undistorted normalised coordinates (x, y) of every pixel, each (H, W) float64.

        Exact (iterative undistortion) on a GRID_STEP_PX lattice, bilinear in between: the lens field is
        smooth, so this is within ~1e-3 px of undistorting every pixel (tests check it) at a fraction
        of the cost. Computed once per lens and image size, shared by every camera in the process."""
        g = _GRIDS.get(self._key)
        if g is None:
            ux, vy = _lattice(self.W, GRID_STEP_PX), _lattice(self.H, GRID_STEP_PX)
            u, v = np.meshgrid(ux, vy)
            n = self._undistort(np.c_[u.ravel(), v.ravel()])
            ax, ay = _interp_matrix(self.W, ux), _interp_matrix(self.H, vy)
            g = tuple(np.ascontiguousarray(ay @ n[:, k].reshape(len(vy), len(ux)) @ ax.T) for k in (0, 1))
            _GRIDS[self._key] = g
        return g

    def norm_grid(self) -> np.ndarray:
        """(H*W, 2) undistorted normalised coordinates of every pixel (see `norm_grids`)."""
        gx, gy = self.norm_grids()
        return np.c_[gx.ravel(), gy.ravel()]

    def canvas_maps(self, px_per_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """cv2.remap maps that turn the ideal canvas (pixel = belt mm * px_per_mm) into this camera's image."""
        xy = self.norm_to_belt(self.norm_grid()) * px_per_mm
        return (xy[:, 0].reshape(self.H, self.W).astype(np.float32),
                xy[:, 1].reshape(self.H, self.W).astype(np.float32))

    def plane_maps(self, plane_to_norm: np.ndarray, src_px_per_mm: float,
                   roi: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Remap maps for a planar target: `plane_to_norm` (3x3) takes target mm to normalised camera
        coordinates; the source image is the target drawn at `src_px_per_mm`. `roi` (x0, y0, x1, y1)
        limits the maps to that part of the image."""
        a = np.linalg.inv(plane_to_norm)
        gx, gy = self.norm_grids()
        if roi is not None:
            x0, y0, x1, y1 = roi
            gx, gy = gx[y0:y1, x0:x1], gy[y0:y1, x0:x1]
        w = a[2, 0] * gx + a[2, 1] * gy + a[2, 2]
        ok = w > 1e-9
        w = np.where(ok, src_px_per_mm / np.where(ok, w, 1.0), 0.0)
        mx = np.where(ok, (a[0, 0] * gx + a[0, 1] * gy + a[0, 2]) * w, -1e6)
        my = np.where(ok, (a[1, 0] * gx + a[1, 1] * gy + a[1, 2]) * w, -1e6)
        return mx.astype(np.float32), my.astype(np.float32)

    def plane_footprint(self, plane_to_norm: np.ndarray, w_mm: float, h_mm: float,
                        pad_px: int = 4) -> tuple[int, int, int, int] | None:
        """Bounding box (x0, y0, x1, y1), clipped to the image, of a w x h mm planar rectangle's image
        (its outline sampled densely, through the lens); None when none of it is in front of the camera."""
        t = np.linspace(0.0, 1.0, 41)
        edge = np.r_[np.c_[t * w_mm, 0 * t], np.c_[w_mm + 0 * t, t * h_mm],
                     np.c_[t * w_mm, h_mm + 0 * t], np.c_[0 * t, t * h_mm]]
        p = np.c_[edge, np.ones(len(edge))] @ np.asarray(plane_to_norm, np.float64).T
        if np.any(p[:, 2] <= 1e-9):
            return (0, 0, self.W, self.H)   # the plane reaches the horizon: no shortcut
        px, _ = cv2.projectPoints(p, np.zeros(3), np.zeros(3), self.K, self.dist)
        px = px.reshape(-1, 2)
        x0, y0 = np.floor(px.min(axis=0)).astype(int) - pad_px
        x1, y1 = np.ceil(px.max(axis=0)).astype(int) + pad_px + 1
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(self.W, x1), min(self.H, y1)
        return (int(x0), int(y0), int(x1), int(y1)) if x1 > x0 and y1 > y0 else None
