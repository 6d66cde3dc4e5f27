"""Turning the calibration file into what the station runs on.

`geometry_from_config` (station.assembly) calls `station_geometry`; `calibrated_config` overlays the
measured encoder scale and diverter positions/latencies on a configuration, for the parts of the
station (sorter, firmware set-up) that read them from the configuration.
"""
from __future__ import annotations

import logging

import numpy as np

from calibration.geometry import BeltGeometry
from calibration.record import CalibrationFile, find_problems
from calibration.store import CalibrationError, CalibrationStore

log = logging.getLogger(__name__)


def geometry_from_calibration(cal: CalibrationFile, cfg) -> BeltGeometry:
    """BeltGeometry from a calibration's belt (and camera, encoder) sections."""
    if cal.belt is None:
        raise CalibrationError("the calibration has no belt section: run `kozan calibrate belt`")
    K = dist = None
    if cal.belt.undistorted:
        if cal.camera is None:
            raise CalibrationError("the belt homography needs the camera section: run `kozan calibrate camera`, "
                                   "then `kozan calibrate belt`")
        K = np.asarray(cal.camera.camera_matrix, np.float64)
        dist = np.asarray(cal.camera.dist_coeffs, np.float64)
    mpc = cal.encoder.mm_per_count if cal.encoder is not None else cfg.line.mm_per_count
    try:
        return BeltGeometry(np.asarray(cal.belt.homography, np.float64), mpc, K, dist)
    except ValueError as e:   # e.g. a homography the file's validator let through but is numerically singular
        raise CalibrationError(f"belt: {e}") from None


def load_checked(cfg) -> CalibrationFile | None:
    """The active calibration, refused (CalibrationError naming what to re-measure) if it has errors."""
    store = CalibrationStore.from_config(cfg)
    cal = store.load()
    if cal is None:
        return None
    errors = [p for p in find_problems(cal, cfg) if p.severity == "error"]
    if errors:
        raise CalibrationError(f"{store.active}: the calibration cannot be used:\n" +
                               "\n".join(f"  - {p}" for p in errors) + f"\n{ROLLBACK_HINT}")
    return cal


ROLLBACK_HINT = ("re-run the tool named above, or make an earlier good version active again "
                 "(`kozan calibrate history` lists them, `kozan calibrate history --rollback N` restores one)")


def check_for_station(cfg) -> None:
    """Everything the station will ask of the calibration, asked up front: raises CalibrationError
    (saying what is wrong, what to re-measure and which file) before any camera, link or records are
    opened. `kozan run` and `kozan sim` call it first."""
    store = CalibrationStore.from_config(cfg)
    try:
        station_cfg = calibrated_config(cfg)
        station_geometry(station_cfg)
    except CalibrationError as e:
        msg = str(e)
        if str(store.active) not in msg:
            msg = f"{store.active}: {msg}"
        if "--rollback" not in msg and store.active.exists():
            msg += f"\n{ROLLBACK_HINT}"
        raise CalibrationError(msg) from None


def station_geometry(cfg) -> BeltGeometry:
    """The station's pixel → mm and encoder scale: the calibration file when there is one; without
    one, the configured scale, but only on the simulated line (whose camera it describes exactly)."""
    cal = load_checked(cfg)
    if cal is None:
        if cfg.camera.source == "sim":
            return BeltGeometry.from_scale(cfg.camera.px_per_mm, cfg.line.mm_per_count)
        raise CalibrationError(f"no calibration at {cfg.resolve(cfg.calibration.path)}: a real camera needs one. "
                               "Print a target (`kozan calibrate target`), then run `kozan calibrate camera`, "
                               "`kozan calibrate belt` and `kozan calibrate encoder`")
    log.info("using calibration version %d (%s)", cal.version, cal.written_at)
    return geometry_from_calibration(cal, cfg)


def calibrated_config(cfg, cal: CalibrationFile | None = None):
    """A copy of `cfg` with the measured encoder scale and diverter positions/latencies in place of the
    configured ones (unchanged where the calibration has no measurement)."""
    cal = load_checked(cfg) if cal is None else cal
    if cal is None:
        return cfg
    data = cfg.model_dump()
    if cal.encoder is not None:
        data["line"]["mm_per_count"] = cal.encoder.mm_per_count
    if cal.diverters is not None:
        meas = {d.id: d for d in cal.diverters.diverters}
        for d in data["diverters"]:
            m = meas.get(d["id"])
            if m is not None:
                d["position_mm"] = m.position_mm
                d["latency_ms"] = m.latency_ms
    return type(cfg).model_validate(data)
