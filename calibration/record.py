"""The calibration file: every measured value, when and how it was measured, and how good it was.

One YAML document per station (`calibration.path`, default `var/calibration/active.yaml`). Each
section is written by one tool (`kozan calibrate camera|belt|encoder|diverters`) and carries its own
timestamp, method and residuals, so `kozan calibrate check` can say exactly which measurement is
missing, stale or out of tolerance — and the station can refuse a bad file naming the tool to re-run.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

FORMAT = 1


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Measured(_M):
    measured_at: str = Field(default_factory=now_iso, description="UTC, ISO 8601")
    method: str = Field(description="how it was measured, e.g. 'charuco 12x8 sq 30 mm, 18 views'")
    source: str = Field("", description="where the data came from: live camera, image folder, simulated line")


class CameraSection(Measured):
    image_size: tuple[int, int]
    camera_matrix: list[list[float]]
    dist_coeffs: list[float]
    rms_px: float = Field(ge=0)
    views: int = Field(ge=1)
    coverage: float = Field(ge=0, le=1, description="share of the image's 4x4 grid cells that saw target corners")
    per_view_rms_px: list[float] = Field(default_factory=list)

    @field_validator("camera_matrix")
    @classmethod
    def _k(cls, v: list[list[float]]) -> list[list[float]]:
        k = np.asarray(v, float)
        if k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
            raise ValueError("camera_matrix must be a finite 3x3 matrix with positive focal lengths")
        return v


class BeltSection(Measured):
    homography: list[list[float]] = Field(description="undistorted image px -> belt mm (x along, y across)")
    undistorted: bool = Field(description="True: pixels are undistorted with the camera section first")
    image_size: tuple[int, int]
    residual_rms_mm: float = Field(ge=0)
    residual_max_mm: float = Field(ge=0)
    residual_by_width_mm: list[tuple[float, float]] = Field(default_factory=list,
                                                            description="(y across the belt, max residual) per band")
    points: int = Field(ge=4)

    @field_validator("homography")
    @classmethod
    def _h(cls, v: list[list[float]]) -> list[list[float]]:
        h = np.asarray(v, float)
        if h.shape != (3, 3) or not np.isfinite(h).all() or abs(np.linalg.det(h)) < 1e-15:
            raise ValueError("homography must be a finite, non-singular 3x3 matrix")
        return v


class EncoderSection(Measured):
    mm_per_count: float = Field(gt=0, le=10)
    residual_rms_mm: float = Field(ge=0)
    spread_pct: float = Field(ge=0, description="standard error of the scale, % of the value")
    samples: int = Field(ge=2)
    travel_mm: float = Field(gt=0, description="belt travel the fit spans")


class DiverterCal(_M):
    id: int = Field(ge=1, le=32)
    position_mm: float = Field(description="belt mm, same frame as the decision line")
    latency_ms: float = Field(ge=0, le=500)
    position_spread_mm: float = Field(ge=0, description="standard deviation over the repeats")
    latency_spread_ms: float = Field(ge=0)
    repeats: int = Field(ge=1)


class DiverterSection(Measured):
    decision_line_mm: float
    diverters: list[DiverterCal]


SECTIONS = ("camera", "belt", "encoder", "diverters")
TOOL_FOR = {"camera": "kozan calibrate camera", "belt": "kozan calibrate belt",
            "encoder": "kozan calibrate encoder", "diverters": "kozan calibrate diverters"}


class CalibrationFile(_M):
    format: int = FORMAT
    version: int = Field(0, ge=0, description="increases with every write; history keeps the older ones")
    written_at: str = Field(default_factory=now_iso)
    note: str = ""
    camera: CameraSection | None = None
    belt: BeltSection | None = None
    encoder: EncoderSection | None = None
    diverters: DiverterSection | None = None

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the calibration: which section, what, and what to do about it."""
    section: str
    severity: str          # "error" stops the station; "warning" is reported by `check`
    what: str

    @property
    def remedy(self) -> str:
        return f"re-run `{TOOL_FOR[self.section]}`" if self.section in TOOL_FOR else "see `kozan calibrate --help`"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.section}: {self.what} — {self.remedy}"


def _age_days(iso: str) -> float:
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return float("inf")
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - t).total_seconds() / 86400.0


def find_problems(cal: CalibrationFile, cfg: Any) -> list[Problem]:
    """Everything missing, stale, inconsistent with the station or out of tolerance.

    Errors are what would make the station sort wrongly (no pixel → mm, a homography for another
    image size, residuals beyond tolerance); warnings are what a technician should fix soon."""
    out: list[Problem] = []
    ccal = cfg.calibration
    size = (cfg.camera.width, cfg.camera.height)
    if cal.belt is None:
        out.append(Problem("belt", "error", "missing: no pixel → mm homography"))
    else:
        b = cal.belt
        if tuple(b.image_size) != size:
            out.append(Problem("belt", "error", f"measured at image size {tuple(b.image_size)}, the camera is "
                                                f"configured for {size}"))
        if b.residual_max_mm > ccal.max_belt_residual_mm:
            out.append(Problem("belt", "error", f"residual {b.residual_max_mm:.2f} mm exceeds the tolerance "
                                                f"{ccal.max_belt_residual_mm} mm (calibration.max_belt_residual_mm)"))
        if b.undistorted and cal.camera is None:
            out.append(Problem("belt", "error", "measured on undistorted pixels but the camera section is missing"))
    if cal.camera is None:
        out.append(Problem("camera", "warning", "missing: lens distortion is not corrected"))
    else:
        c = cal.camera
        if tuple(c.image_size) != size:
            out.append(Problem("camera", "error", f"measured at image size {tuple(c.image_size)}, the camera is "
                                                  f"configured for {size}"))
        if c.rms_px > ccal.max_reprojection_px:
            out.append(Problem("camera", "error", f"reprojection error {c.rms_px:.2f} px exceeds "
                                                  f"{ccal.max_reprojection_px} px (calibration.max_reprojection_px)"))
        if cal.belt is not None and cal.belt.undistorted and _age_days(c.measured_at) < _age_days(cal.belt.measured_at) \
                and c.measured_at != cal.belt.measured_at:
            out.append(Problem("belt", "error", "the camera was re-calibrated after the belt: the homography was "
                                                "fitted to the old lens model"))
    if cal.encoder is None:
        out.append(Problem("encoder", "warning", f"missing: using the configured line.mm_per_count="
                                                 f"{cfg.line.mm_per_count}"))
    if cal.diverters is None:
        out.append(Problem("diverters", "warning", "missing: using the configured diverter positions and latencies"))
    else:
        ids = {d.id for d in cfg.diverters if d.enabled}
        got = {d.id for d in cal.diverters.diverters}
        if ids - got:
            out.append(Problem("diverters", "warning", f"diverter(s) {sorted(ids - got)} not measured"))
        if got - {d.id for d in cfg.diverters}:
            out.append(Problem("diverters", "error", f"diverter(s) {sorted(got - {d.id for d in cfg.diverters})} "
                                                     "are not in the configuration"))
        for d in cal.diverters.diverters:
            if d.position_mm <= cfg.line.decision_line_mm:
                out.append(Problem("diverters", "error", f"diverter {d.id} measured at {d.position_mm:.1f} mm, not "
                                                         f"downstream of the decision line {cfg.line.decision_line_mm}"))
        if abs(cal.diverters.decision_line_mm - cfg.line.decision_line_mm) > 1e-6:
            out.append(Problem("diverters", "warning", f"measured against decision line "
                                                       f"{cal.diverters.decision_line_mm} mm, configured "
                                                       f"{cfg.line.decision_line_mm} mm"))
    for name in SECTIONS:
        sec = getattr(cal, name)
        if sec is not None and _age_days(sec.measured_at) > ccal.max_age_days:
            out.append(Problem(name, "warning", f"stale: measured {sec.measured_at}, older than "
                                                f"{ccal.max_age_days:g} days (calibration.max_age_days)"))
    return out
