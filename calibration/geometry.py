"""Pixel → belt-plane millimetres, and belt millimetres ↔ encoder counts.

The station reasons in belt millimetres: x along the belt (downstream positive, 0 at the camera
view's upstream edge), y across it. A detection becomes a belt-fixed coordinate
`u = x - travel`, which does not change while the item rides the belt: that is what makes
tracking a prediction problem and lets a divert command name the exact encoder count at which
the item reaches its diverter.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2

import numpy as np

_UNDIST = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)   # converge even at the image corners


@dataclass(frozen=True)
class BeltGeometry:
    homography: np.ndarray    # 3x3, image px (undistorted when camera_matrix is set) -> belt-plane mm
    mm_per_count: float
    camera_matrix: np.ndarray | None = None   # lens model from `kozan calibrate camera`; None = no distortion
    dist_coeffs: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.homography.shape != (3, 3):
            raise ValueError(f"homography must be 3x3, got {self.homography.shape}")
        if not np.isfinite(self.homography).all() or abs(np.linalg.det(self.homography)) < 1e-12:
            raise ValueError("homography is singular or not finite: re-run `kozan calibrate belt`")
        if not self.mm_per_count > 0:
            raise ValueError(f"mm_per_count must be > 0, got {self.mm_per_count}")

    @staticmethod
    def from_scale(px_per_mm: float, mm_per_count: float) -> "BeltGeometry":
        """A camera looking straight down with no distortion (the simulated line's camera)."""
        h = np.diag([1.0 / px_per_mm, 1.0 / px_per_mm, 1.0])
        return BeltGeometry(h, mm_per_count)

    def px_to_mm(self, pts: np.ndarray) -> np.ndarray:
        """(N, 2) pixel points -> (N, 2) belt mm."""
        p = np.asarray(pts, np.float64).reshape(-1, 2)
        if self.camera_matrix is not None and len(p):
            # undistort into the ideal pinhole image of the same camera matrix, where the plane is a homography
            p = cv2.undistortPoints(p.reshape(-1, 1, 2), self.camera_matrix, self.dist_coeffs,
                                    P=self.camera_matrix, criteria=_UNDIST).reshape(-1, 2)
        hom = np.c_[p, np.ones(len(p))] @ self.homography.T
        return hom[:, :2] / hom[:, 2:3]

    def travel_mm(self, count: int | float) -> float:
        return float(count) * self.mm_per_count

    def count_at_travel(self, mm: float) -> float:
        return mm / self.mm_per_count
