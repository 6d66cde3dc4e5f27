"""The measurements: from target detections, encoder counts and sensor reports to calibrated values.

Each solver returns its section of the calibration file plus a list of reasons the data is not good
enough (empty when it is); the command line prints them and exits non-zero rather than write a
calibration that would sort wrongly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np

from calibration.record import BeltSection, CameraSection, DiverterCal, DiverterSection, EncoderSection
from calibration.targets import Detection, TargetSpec

log = logging.getLogger(__name__)

GRID = 4   # coverage is judged on a GRID x GRID split of the image
_UNDIST = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)


@dataclass
class Result:
    section: object
    problems: list[str] = field(default_factory=list)     # any one: not good enough, nothing is written
    table: list[tuple[str, str]] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)       # good enough, but the technician should know


def coverage_cells(dets: list[Detection], size: tuple[int, int]) -> np.ndarray:
    W, H = size
    seen = np.zeros((GRID, GRID), bool)
    for d in dets:
        gx = np.clip((d.px[:, 0] / W * GRID).astype(int), 0, GRID - 1)
        gy = np.clip((d.px[:, 1] / H * GRID).astype(int), 0, GRID - 1)
        seen[gy, gx] = True
    return seen


def _cell_name(r: int, c: int) -> str:
    v = ["top", "upper-middle", "lower-middle", "bottom"][r]
    h = ["left", "centre-left", "centre-right", "right"][c]
    return f"{v} {h}"


def calibrate_camera(dets: list[Detection], size: tuple[int, int], spec: TargetSpec, source: str,
                     min_views: int = 8, max_rms_px: float = 1.0, min_coverage: float = 0.75) -> Result:
    """Intrinsics and distortion (k1 k2 p1 p2 k3) from target views (OpenCV's Zhang calibration)."""
    good = [d for d in dets if len(d) >= 8]
    problems: list[str] = []
    if len(good) < min_views:
        problems.append(f"only {len(good)} usable views (need ≥ {min_views}): take more, with the target tilted "
                        "and in every part of the image")
        if len(good) < 4:
            return Result(None, problems)
    obj = [np.c_[d.obj_mm, np.zeros(len(d))].astype(np.float32) for d in good]
    img = [d.px.astype(np.float32) for d in good]
    rms, K, dist, rvecs, tvecs = cv2.calibrateCamera(obj, img, size, None, None)
    per_view = []
    for o, i, r, t in zip(obj, img, rvecs, tvecs):
        proj, _ = cv2.projectPoints(o, r, t, K, dist)
        per_view.append(float(np.sqrt(np.mean(np.sum((proj.reshape(-1, 2) - i) ** 2, axis=1)))))
    seen = coverage_cells(good, size)
    cov = float(seen.mean())
    missing = [_cell_name(r, c) for r in range(GRID) for c in range(GRID) if not seen[r, c]]
    if cov < min_coverage:
        problems.append(f"coverage {cov:.0%} (need ≥ {min_coverage:.0%}); missing views with the target in: "
                        + ", ".join(missing))
    if rms > max_rms_px:
        worst = int(np.argmax(per_view))
        problems.append(f"reprojection error {rms:.2f} px > {max_rms_px} px (worst view #{worst + 1}: "
                        f"{per_view[worst]:.2f} px — blurred or moving? retake it)")
    tilts = [np.degrees(np.arccos(abs(cv2.Rodrigues(r)[0][2, 2]))) for r in rvecs]
    if max(tilts) < 15:
        problems.append("all views face the camera squarely: add views tilted 20–40° (focal length is poorly "
                        "determined without them)")
    sec = CameraSection(method=f"{spec.describe()}; {len(good)} views; cv2.calibrateCamera (k1 k2 p1 p2 k3)",
                        source=source, image_size=size, camera_matrix=K.tolist(),
                        dist_coeffs=[float(x) for x in dist.ravel()[:5]], rms_px=float(rms), views=len(good),
                        coverage=cov, per_view_rms_px=per_view)
    table = [("views", str(len(good))), ("fx, fy (px)", f"{K[0, 0]:.2f}, {K[1, 1]:.2f}"),
             ("cx, cy (px)", f"{K[0, 2]:.2f}, {K[1, 2]:.2f}"),
             ("k1 k2 p1 p2 k3", " ".join(f"{x:+.4f}" for x in dist.ravel()[:5])),
             ("reprojection RMS (px)", f"{rms:.3f}"), ("coverage", f"{cov:.0%}"),
             ("max tilt (deg)", f"{max(tilts):.0f}"), ("missing views", ", ".join(missing) or "none")]
    return Result(sec, problems, table)


def undistort_px(px: np.ndarray, K: np.ndarray | None, dist: np.ndarray | None) -> np.ndarray:
    if K is None:
        return np.asarray(px, np.float64)
    return cv2.undistortPoints(np.asarray(px, np.float64).reshape(-1, 1, 2), K, dist, P=K,
                               criteria=_UNDIST).reshape(-1, 2)


def _apply_h(H: np.ndarray, p: np.ndarray) -> np.ndarray:
    h = np.c_[p, np.ones(len(p))] @ H.T
    return h[:, :2] / h[:, 2:3]


def _rigid(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R and translation t with dst ≈ src @ R.T + t, least squares (Kabsch, no scale:
    the target's size is known)."""
    ms, md = src.mean(axis=0), dst.mean(axis=0)
    U, _, Vt = np.linalg.svd((src - ms).T @ (dst - md))
    D = np.diag([1.0, np.sign(np.linalg.det(Vt.T @ U.T))])
    R = Vt.T @ D @ U.T
    return R, md - ms @ R.T


def fit_belt(dets: list[Detection], size: tuple[int, int], spec: TargetSpec, source: str,
             K: np.ndarray | None, dist: np.ndarray | None, target_y_mm: float = 0.0,
             max_residual_mm: float = 1.0, belt_width_mm: float = 400.0) -> Result:
    """Belt-plane homography from a target lying flat on the belt, its x-axis along the belt.

    Belt frame: x = 0 where the image's upstream edge (column 0, middle row) meets the belt, as the
    configuration's decision line and diverter positions assume; y = target y + `target_y_mm` (the
    distance of the target's first row of squares from the belt's near edge) in the first image.

    Further images are further placements of the same target (slid across the belt, so that a target
    narrower than the belt still covers its whole width): their position on the belt need not be
    known — each is registered by a rigid move of the target, fitted together with the homography."""
    dets = [d for d in dets if len(d) >= 6]
    if not dets:
        return Result(None, ["the target was not found in any image: is it flat on the belt, fully lit and "
                             "in focus? (`kozan calibrate target` prints one)"])
    pxs = [undistort_px(d.px, K, dist) for d in dets]
    objs = [np.asarray(d.obj_mm, np.float64).copy() for d in dets]
    Hm, _ = cv2.findHomography(pxs[0], objs[0], 0)
    if Hm is None:
        return Result(None, ["the homography fit failed: the detected corners are degenerate (collinear?)"])
    # alternate: register each later placement on the current fit, then refit on all of them
    for _ in range(10 if len(dets) > 1 else 0):
        for i in range(1, len(dets)):
            R, t = _rigid(dets[i].obj_mm, _apply_h(Hm, pxs[i]))
            objs[i] = dets[i].obj_mm @ R.T + t
        Hm_new, _ = cv2.findHomography(np.vstack(pxs), np.vstack(objs), 0)
        if Hm_new is None:
            return Result(None, ["the homography fit failed: the detected corners are degenerate (collinear?)"])
        step = float(np.abs(_apply_h(Hm_new, pxs[0]) - _apply_h(Hm, pxs[0])).max())
        Hm = Hm_new
        if step < 1e-6:
            break
    px, obj = np.vstack(pxs), np.vstack(objs)
    W, H = size
    edge = _apply_h(Hm, undistort_px(np.array([[0.0, (H - 1) / 2]]), K, dist))[0]
    shift = np.array([[1, 0, -edge[0]], [0, 1, target_y_mm], [0, 0, 1.0]])
    Hb = shift @ Hm
    Hb /= Hb[2, 2]
    res = np.linalg.norm(_apply_h(Hm, px) - obj, axis=1)
    y_belt = obj[:, 1] + target_y_mm
    bands = []
    edges = np.linspace(0.0, belt_width_mm, 5)
    for a, b in zip(edges[:-1], edges[1:]):
        m = (y_belt >= a) & (y_belt < b)
        bands.append(((a + b) / 2, float(res[m].max()) if m.any() else float("nan")))
    empty = [(a, b) for (a, b), (_, v) in zip(zip(edges[:-1], edges[1:]), bands) if not np.isfinite(v)]
    advice = []
    if empty:
        where = ", ".join(f"y {a:.0f}–{b:.0f} mm" for a, b in empty)
        advice.append(f"no target corners across {where} of the belt: the residual there is not measured. Lay the "
                      "target there as well — a second placement (live camera: --placements 2; with --images: a "
                      "second image of the target slid across; simulated line: --sim-second-y-mm Y) — and run "
                      "`kozan calibrate belt` again")
    problems = []
    if len(obj) < 20:
        problems.append(f"only {len(obj)} target corners seen (need ≥ 20): is the target in the view?")
    if res.max() > max_residual_mm:
        problems.append(f"residual {res.max():.2f} mm > {max_residual_mm} mm: is the target flat? "
                        + ("run `kozan calibrate camera` first — lens distortion is not corrected" if K is None else
                           "is the camera calibration current?"))
    span = y_belt.max() - y_belt.min()
    if span < 0.4 * belt_width_mm:
        problems.append(f"the target spans only {span:.0f} mm across the belt (need ≥ {0.4 * belt_width_mm:.0f}): "
                        "use a larger target")
    sec = BeltSection(method=f"{spec.describe()}; {len(dets)} placement(s), {len(obj)} corners; least-squares "
                             f"homography on {'undistorted' if K is not None else 'raw'} pixels"
                             + ("; later placements registered by a rigid move" if len(dets) > 1 else ""),
                      source=source, homography=Hb.tolist(), undistorted=K is not None, image_size=size,
                      residual_rms_mm=float(np.sqrt(np.mean(res ** 2))), residual_max_mm=float(res.max()),
                      residual_by_width_mm=[(float(y), v) for y, v in bands if np.isfinite(v)], points=len(obj))
    table = [("placements", str(len(dets))), ("corners", str(len(obj))),
             ("residual RMS (mm)", f"{sec.residual_rms_mm:.3f}"), ("residual max (mm)", f"{sec.residual_max_mm:.3f}"),
             ("scale at centre (px/mm)", f"{_local_scale(Hb, W / 2, H / 2):.4f}"),
             ("max residual across the belt", "")]
    for (a, b), (_, v) in zip(zip(edges[:-1], edges[1:]), bands):
        table.append((f"  y {a:3.0f}–{b:3.0f} mm", f"{v:.3f} mm" if np.isfinite(v) else
                      "no points — lay the target here too (a second placement)"))
    return Result(sec, problems, table, advice)


def _local_scale(Hb: np.ndarray, u: float, v: float) -> float:
    a = _apply_h(Hb, np.array([[u, v], [u + 1, v]]))
    return 1.0 / float(np.linalg.norm(a[1] - a[0]))


def target_origin_mm(det: Detection, geom) -> tuple[float, float]:
    """Belt-mm position of the target's origin corner in one image (mean over its corners)."""
    mm = geom.px_to_mm(det.px)
    d = mm - det.obj_mm
    return float(d[:, 0].mean()), float(d[:, 1].mean())


def fit_encoder(samples: list[tuple[float, int]], source: str, method: str,
                max_spread_pct: float = 0.05, min_travel_mm: float = 150.0) -> Result:
    """mm per count from (target x in belt mm, encoder count) pairs: the slope of a straight-line fit."""
    problems = []
    if len(samples) < 5:
        return Result(None, [f"only {len(samples)} frames with the target (need ≥ 5): let the belt carry the target "
                             "through the whole view"])
    x = np.array([s[0] for s in samples])
    c = np.array([s[1] for s in samples], float)
    A = np.c_[c, np.ones(len(c))]
    (slope, icpt), *_ = np.linalg.lstsq(A, x, rcond=None)
    resid = x - A @ np.array([slope, icpt])
    dof = max(1, len(c) - 2)
    se = float(np.sqrt(np.sum(resid ** 2) / dof / np.sum((c - c.mean()) ** 2)))
    travel = float(x.max() - x.min())
    if slope <= 0:
        return Result(None, ["the target moved upstream as the counts rose: check the encoder's direction/wiring"])
    spread = 100.0 * se / slope
    if travel < min_travel_mm:
        problems.append(f"the target travelled only {travel:.0f} mm (need ≥ {min_travel_mm:.0f})")
    if spread > max_spread_pct:
        problems.append(f"scale uncertain by {spread:.3f} % (need ≤ {max_spread_pct} %): is the belt slipping "
                        "under the target, or the target sliding?")
    sec = EncoderSection(method=method, source=source, mm_per_count=float(slope),
                         residual_rms_mm=float(np.sqrt(np.mean(resid ** 2))), spread_pct=spread, samples=len(c),
                         travel_mm=travel)
    table = [("frames", str(len(c))), ("travel (mm)", f"{travel:.1f}"), ("mm per count", f"{slope:.6f}"),
             ("standard error (%)", f"{spread:.4f}"), ("fit residual RMS (mm)", f"{sec.residual_rms_mm:.3f}")]
    return Result(sec, problems, table)


@dataclass
class DiverterRun:
    """One repeat for one diverter: where the puck's centre was (belt-fixed, mm) and the gate's count;
    and one firing: the MCU's fired count, the gate's action count and the belt speed in counts/s."""
    diverter: int
    puck_centre_u_mm: float
    gate_count: float          # count when the puck's centre crossed the gate (mid of blocked/clear edges)
    fired_count: int
    action_count: int
    counts_per_s: float
    latency_ms: float | None = None   # measured on the MCU clock (sensor edge − Fired); else from the counts


def fit_diverters(runs: list[DiverterRun], mm_per_count: float, decision_line_mm: float, source: str,
                  max_pos_spread_mm: float = 2.0, max_lat_spread_ms: float = 2.0, min_repeats: int = 3,
                  method: str | None = None) -> Result:
    """Position (belt mm) and actuator latency (ms) of each diverter, mean and spread over repeats."""
    problems = []
    cals = []
    table = []
    for d in sorted({r.diverter for r in runs}):
        rs = [r for r in runs if r.diverter == d]
        pos = np.array([r.puck_centre_u_mm + r.gate_count * mm_per_count for r in rs])
        lat = np.array([r.latency_ms if r.latency_ms is not None else
                        (r.action_count - r.fired_count) / r.counts_per_s * 1000.0 for r in rs])
        ps = float(pos.std(ddof=1)) if len(rs) > 1 else 0.0
        ls = float(lat.std(ddof=1)) if len(rs) > 1 else 0.0
        if len(rs) < min_repeats:
            problems.append(f"diverter {d}: {len(rs)} repeats (need ≥ {min_repeats})")
        if ps > max_pos_spread_mm:
            problems.append(f"diverter {d}: position spread {ps:.2f} mm > {max_pos_spread_mm} mm — is the light "
                            "gate loose, or the puck sliding?")
        if ls > max_lat_spread_ms:
            problems.append(f"diverter {d}: latency spread {ls:.2f} ms > {max_lat_spread_ms} ms — check the air "
                            "supply / actuator")
        if np.any(lat < 0):
            problems.append(f"diverter {d}: the actuator moved before it was fired — wrong gate wired?")
        lat_mean = float(max(0.0, lat.mean()))
        cals.append(DiverterCal(id=d, position_mm=float(pos.mean()), latency_ms=lat_mean, position_spread_mm=ps,
                                latency_spread_ms=ls, repeats=len(rs)))
        table.append((f"diverter {d}", f"{pos.mean():8.2f} mm (decision line +{pos.mean() - decision_line_mm:7.2f})"
                                       f" ± {ps:.2f}   latency {lat_mean:6.2f} ms ± {ls:.2f}   n={len(rs)}"))
    if not cals:
        return Result(None, ["no diverter measurements"])
    sec = DiverterSection(method=method or "puck through the camera view + light gate at each diverter "
                                           "(position); fire_now + gate on the actuator (latency)", source=source,
                          decision_line_mm=decision_line_mm, diverters=cals)
    return Result(sec, problems, table)
