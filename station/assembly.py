"""Building a station from its configuration: the parts and how they connect.

The only place that knows whether the camera and the diverter controller are real or simulated;
everything downstream sees the same interfaces.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from calibration.geometry import BeltGeometry
from station.clock import Clock
from station.config import StationConfig

log = logging.getLogger(__name__)


def geometry_from_config(cfg: StationConfig) -> BeltGeometry:
    """Belt geometry from the calibration file (`calibration.path`) when there is one. Without one the
    camera's configured scale stands in for the homography — only on the simulated line, where it is
    exact for the straight-down camera; a real camera without a calibration is refused."""
    from calibration.apply import station_geometry
    from calibration.store import CalibrationError
    from station.config import ConfigError

    try:
        return station_geometry(cfg)
    except CalibrationError as e:
        raise ConfigError(str(e)) from None


def detector_settings(cfg: StationConfig, beside_threads: bool = True) -> dict[str, Any]:
    """The Detector's keyword arguments from `detector.*`: the start and every hot-swap alike.

    `beside_threads`: capture, looks and the link run on threads of their own (real time). There,
    onnxruntime's spinning workers take the cores those threads need: on 2 cores the loop dropped
    more frames than with sleeping workers. In virtual time nothing else runs, and spinning inside a
    run is the faster choice.
    """
    d = cfg.detector
    spin = d.spin if d.spin != "auto" else ("never" if beside_threads else "run")
    return dict(conf_threshold=d.conf_threshold, iou_threshold=d.iou_threshold,
                threads=detector_threads(d.intra_op_threads, beside_threads, usable_cpus()),
                max_detections=d.max_detections, agnostic_nms=d.agnostic_nms, spin=spin)


def detector_threads(configured: int | str, beside_threads: bool, cpus: int) -> int:
    """onnxruntime's intra-op threads for `detector.intra_op_threads` (`auto` resolved here only).

    Why 1 on 2 cores in real time: the second onnxruntime thread runs on the core that capture, the
    looks and the link need, and every inference then waits for it (bench/loop_threads.py: 2 threads
    dropped 0-11 frames in 40 s at 60 fps and took ~20 % more CPU; 1 thread dropped 0-3, and the
    capture-to-decision latency was no worse). With more cores the 2 threads measured before stay.
    """
    if configured != "auto":
        return int(configured)
    return 1 if beside_threads and cpus <= 2 else 2


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        return os.cpu_count() or 1


def build_detector(cfg: StationConfig, beside_threads: bool = True):
    import cv2

    from vision.detector import Detector

    # OpenCV's pool is process-wide and defaults to one thread per CPU: on a larger PC than the
    # 2 cores this is sized for it would crowd onnxruntime's threads; say it once, here
    cv2.setNumThreads(cfg.detector.opencv_threads)
    # the Detector reads models/active.onnx as "the registry's active version" (models/ACTIVE.json)
    return Detector(cfg.resolve(cfg.detector.model), **detector_settings(cfg, beside_threads))


def build_looks(cfg: StationConfig, threaded: bool):
    """The inspectors' looks (station.looks: on a worker thread in real time), or None where the
    config names neither inspector: the station then relies on the detector's view alone."""
    ic = cfg.inspector
    if ic.model is None and ic.battery_model is None:
        return None
    from station.looks import InlineLooks, ThreadedLooks
    from vision.inspection import BatteryInspector, BoardInspector
    from vision.taxonomy import load_taxonomy

    inspectors: dict[str, Any] = {}
    if ic.model is not None:
        batteries = {c.name for c in load_taxonomy().classes if c.is_battery}
        inspectors["board"] = BoardInspector(cfg.resolve(ic.model), batteries, conf=ic.conf_threshold,
                                             min_inside=cfg.rules.attached_overlap, threads=ic.intra_op_threads)
    if ic.battery_model is not None:
        inspectors["battery"] = BatteryInspector(cfg.resolve(ic.battery_model), conf=ic.battery_conf_threshold,
                                                 threads=ic.intra_op_threads)
    return ThreadedLooks(inspectors) if threaded else InlineLooks(inspectors)


@dataclass
class LinkBundle:
    link: Any                      # firmware_bridge.DiverterLink
    firmware: Any | None           # the firmware simulator when the line is simulated
    port: str

    def close(self) -> None:
        try:
            self.link.close()
        finally:
            if self.firmware is not None:
                self.firmware.stop()


def open_link(cfg: StationConfig, clock: Clock, environment: Any | None = None,
              watchdog_clock: Callable[[], float] | None = None) -> LinkBundle:
    """Open and configure the diverter link. With `link.port: sim` the firmware simulator is
    started on a fresh pseudo-terminal against `environment` (the simulated belt)."""
    from firmware_bridge import DiverterLink, DiverterSetup, FirmwareSimulator

    fw = None
    port = cfg.link.port
    if port == "sim":
        if environment is None:
            raise ValueError("link.port=sim needs the simulated line (camera.source=sim)")
        fw = FirmwareSimulator.on_new_pty(environment, watchdog_clock=watchdog_clock)
        fw.start()
        port = fw.slave_path
    link = DiverterLink(port, baudrate=cfg.link.baudrate, clock=clock.now)
    try:
        link.open(timeout=3.0)
        link.configure(cfg.line.mm_per_count,
                       [DiverterSetup(d.id, int(round(d.latency_ms * 1000)), int(round(d.max_on_ms)))
                        for d in cfg.diverters if d.enabled],
                       watchdog_ms=cfg.link.watchdog_ms, report_interval_ms=cfg.link.report_interval_ms,
                       timeout=3.0)
    except Exception:
        link.close()
        if fw is not None:
            fw.stop()
        raise
    log.info("diverter link open on %s", port)
    return LinkBundle(link, fw, port)


def wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.002) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()
