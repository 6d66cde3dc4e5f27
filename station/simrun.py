"""The simulated line in virtual time: fast, deterministic for a seed, judged from ground truth.

Time moves only between frames. After each frame the driver waits until the MCU (the firmware
simulator, on the far end of a real pseudo-terminal) has answered every command and run a
service pass at the new time, so what fires — and what the world judges — does not depend on
how busy the machine is. Everything else is the same code as a real line.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from station.alarms import AlarmBoard
from station.assembly import build_detector, build_looks, geometry_from_config, open_link
from station.clock import VirtualClock
from station.config import StationConfig
from station.core import StationCore
from station.records import Records
from station.report import sorting_report
from station.simline.camera import SimCamera
from station.simline.world import BeltWorld
from vision.taxonomy import load_taxonomy

log = logging.getLogger(__name__)


def run_fast(cfg: StationConfig, n_items: int, seed: int | None = None, records_path: str | Path | None = None,
             detector: Any = None, progress: Any = None, max_line_s: float | None = None,
             oracle: bool = False, look_seed: int | None = None, capture_dir: str | Path | None = None,
             on_frame: Any = None) -> dict[str, Any]:
    """Run `n_items` through the simulated line in virtual time; returns the judged report.

    `look_seed` fixes the camera's look (belt, light, lens) apart from the items' seed: one
    station sees many item streams under the same look. With `capture.enabled` (or a
    `capture_dir`) frames are captured as on a real line, with the simulator's ground truth in
    each capture's metadata (`sim_truth`: the labeller's answer key). `on_frame(k, core)` runs
    after each frame (tests: hot-swap a model mid-run).
    """
    if cfg.camera.source != "sim" or cfg.link.port != "sim":
        raise ValueError("the fast simulation needs camera.source=sim and link.port=sim")
    wall0 = time.monotonic()
    # In virtual time the host may stall for wall-clock seconds (a busy machine, GC) while no belt
    # time passes at all; the MCU watchdog guards real time, so here it only catches a dead host.
    cfg = cfg.model_copy(deep=True)
    cfg.link.watchdog_ms = max(cfg.link.watchdog_ms, 5000)
    # the world and camera are the truth; the station runs on what calibration says about them (a
    # calibration the station refuses raises CalibrationError here, before anything is opened)
    from calibration.apply import calibrated_config
    station_cfg = calibrated_config(cfg)
    clock = VirtualClock(0.0)
    world = BeltWorld(cfg, clock, n_items=n_items, seed=seed)
    camera = SimCamera(cfg, world, clock, seed=seed if look_seed is None else look_seed)
    if oracle:
        from station.simline.oracle import OracleDetector
        det = OracleDetector(camera)
    else:
        det = detector or build_detector(cfg, beside_threads=False)   # virtual time: one thread
    tmp = None
    if records_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="kozan-sim-")
        records_path = Path(tmp.name) / "records.sqlite"
    records = Records(records_path, batch_s=cfg.records.batch_s, synchronous=cfg.records.synchronous)
    # the watchdog runs on wall time: virtual time outpaces the host's wall-clock heartbeats
    bundle = open_link(station_cfg, clock, environment=world, watchdog_clock=time.monotonic)
    capture = None
    # from here on the link (and the simulator's pty) is open: every way out closes it, link first
    try:
        link, fw = bundle.link, bundle.firmware
        cps = cfg.line.belt_speed_mm_s / cfg.line.mm_per_count
        core = StationCore(station_cfg, det, link, records, load_taxonomy(), geometry_from_config(station_cfg),
                           clock.now, counts_per_s=lambda: cps, model_version=det.info.version, alarms=AlarmBoard(clock.now),
                           inspector=None if oracle else build_looks(cfg, threaded=False))
        core.alarms.listeners.append(records.alarm_raised)    # every alarm raise goes on record
        if capture_dir is not None or cfg.capture.enabled:
            from station.capture import open_capture

            cfg.capture.enabled = True
            capture = open_capture(cfg, tuple(det.names), core.alarms, lambda: core.model_version,
                                   truth=lambda: camera.last_truth,
                                   root=Path(capture_dir) if capture_dir is not None else None,
                                   wait_for_writer=True,          # virtual time: no frame deadline to protect
                                   # the same run (seed, look, items) captures the same frames under the same
                                   # names' run part, so a dataset split of them is the same each time too
                                   run_id=f"s{cfg.sim.seed if seed is None else seed}l{look_seed or 0}n{n_items}")
            core.capture = capture
        records.start_run("sim-fast", det.info.version, cfg.model_dump(mode="json"))
        period = 1.0 / cfg.camera.fps
        k = 0
        limit = max_line_s or (n_items * 60.0 / cfg.sim.items_per_min * 3 + 60.0)
        while not world.all_items_past():
            t = k * period
            if t > limit:
                raise RuntimeError(f"simulation did not finish within {limit:.0f} s of line time")
            clock.advance_to(t)
            if not fw.sync(timeout=5.0):
                raise RuntimeError("firmware simulator stopped answering")
            frame = camera.render_at(t)
            res = core.process(frame)
            if res.decisions and not link.wait_settled(timeout=5.0):
                raise RuntimeError("diverter link: commands unanswered for 5 s (wall time)")
            core.handle_link_events()
            world.settle()
            if on_frame is not None:
                on_frame(k, core)
            k += 1
            if progress and k % 300 == 0:
                progress(world, core)
        fw.sync(timeout=5.0)
        link.wait_settled(timeout=5.0)
        core.handle_link_events()
        world.settle(final=True)
        records.end_run(core.counters.as_dict())
        health = link.health()
    finally:
        if capture is not None:
            capture.close()
        bundle.close()
        records.close()
        if tmp is not None:
            tmp.cleanup()
    wall = time.monotonic() - wall0
    rep = sorting_report(world.items, cfg)
    rep.update({
        "missed": core.counters.missed,
        "frames": core.counters.frames,
        "frames_rendered": k,
        "dropped_frames": 0,
        "line_s": round(k * period, 2),
        "wall_s": round(wall, 2),
        "speedup": round(k * period / wall, 2) if wall > 0 else None,
        "model_version": det.info.version,
        "model_versions": sorted({det.info.version, *(s_["to"] for s_ in core.swaps)}),
        "swaps": core.swaps,
        "capture": capture.stats.as_dict() if capture is not None else None,
        "seed": cfg.sim.seed if seed is None else seed,
        "belt_speed_mm_s": cfg.line.belt_speed_mm_s,
        "station": core.counters.as_dict(),
        "alarms": core.alarms.counts(),
        "link": {k_: v for k_, v in health.items() if k_ in ("rtt_ms", "retries", "resyncs", "crc_errors",
                                                               "naks", "resets", "timeouts")},
    })
    return rep
