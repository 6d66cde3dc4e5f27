"""`kozan calibrate ...`: the technicians' calibration tools.

Each tool says what to do, shows progress, prints its result as a table, and exits non-zero with the
reason when the data is not good enough. On the simulated line (camera.source=sim) the tools measure
the simulated hardware; with --images they read a folder; otherwise the live camera.
"""
from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from calibration.record import find_problems
from calibration.solve import Result, calibrate_camera, fit_belt, fit_diverters, fit_encoder, target_origin_mm
from calibration.store import CalibrationError, CalibrationStore
from calibration.targets import TargetDetector, TargetSpec, write_pdf, write_png

EXIT_BAD_DATA = 3


def _say(msg: str) -> None:
    print(msg, flush=True)


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    w = max([len(a) for a, _ in rows] + [10])
    _say(f"\n{title}\n" + "-" * (w + 30))
    for a, b in rows:
        _say(f"{a:<{w}}  {b}")


def _progress(i: int, n: int | None, what: str) -> None:
    sys.stderr.write(f"\r  {what} {i}" + (f"/{n}" if n else "") + "   ")
    sys.stderr.flush()


def _cfg(a: argparse.Namespace):
    from station.cli import _load   # lazy: station.cli imports this module

    return _load(a)


def _spec(a: argparse.Namespace) -> TargetSpec:
    return TargetSpec(a.squares_x, a.squares_y, a.square_mm, a.marker_mm, a.dictionary)


def _images(folder: str) -> Iterator[tuple[Path, np.ndarray]]:
    import cv2

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not paths:
        raise CalibrationError(f"{folder}: no images (.png/.jpg/.bmp) found")
    for p in paths:
        img = cv2.imread(str(p))
        if img is not None:
            yield p, img


def _live(cfg, n: int, prompts: list[str] | None = None) -> Iterator[np.ndarray]:
    from vision.sources import open_camera

    cam = open_camera(cfg.camera.source, cfg.camera.width, cfg.camera.height, cfg.camera.fps)
    try:
        for i in range(n):
            what = prompts[i] if prompts and i < len(prompts) else "position the target, hold it still"
            input(f"  {what}, press Enter to capture... ")
            yield cam.read().image
    finally:
        cam.close()


def _finish(a: argparse.Namespace, cfg, section: str, res: Result, title: str) -> int:
    if res.table:
        _table(title, res.table)
    if res.problems or res.section is None:
        _say("\nNOT GOOD ENOUGH — nothing was written:")
        for p in res.problems:
            _say(f"  - {p}")
        return EXIT_BAD_DATA
    if res.advice:
        _say("\nnote:")
        for n in res.advice:
            _say(f"  - {n}")
    store = CalibrationStore.from_config(cfg)
    if not a.yes:
        ans = input(f"\nwrite this {section} calibration to {store.active} (the old one is kept in the history)? [y/N] ")
        if ans.strip().lower() not in ("y", "yes"):
            _say("not written")
            return 1
    new = store.update(section, res.section, note=f"{section} calibrated")
    _say(f"\nwritten: {store.active} (version {new.version})")
    return 0


# ---- commands --------------------------------------------------------------------------------------------
def cmd_target(a: argparse.Namespace) -> int:
    spec = _spec(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"charuco_{spec.squares_x}x{spec.squares_y}_{spec.square_mm:g}mm"
    png = write_png(spec, out / f"{stem}.png", a.dpi)
    pdf = write_pdf(spec, out / f"{stem}.pdf", a.dpi)
    w, h = spec.size_mm
    _table("printable target", [("target", spec.describe()), ("size", f"{w:g} x {h:g} mm (+10 mm margin)"),
                                ("PNG", f"{png} ({a.dpi:g} dpi)"), ("PDF", str(pdf))])
    _say("\nPrint the PDF at 100 % / 'actual size' on matte paper and glue it to a flat, rigid board.\n"
         f"Measure one square with a ruler: it must be {spec.square_mm:g} mm (else pass the measured --square-mm).")
    return 0


def cmd_camera(a: argparse.Namespace) -> int:
    cfg = _cfg(a)
    spec = _spec(a)
    det = TargetDetector(spec)
    if a.images:
        _say(f"Camera calibration from the images in {a.images}: each should show the target sharp, at working "
             "distance; together they should put it in every part of the image (corners too), tilted 20–40° in "
             "different directions. At least 8 images must show the target; 16 or more is better.")
    else:
        _say("Camera calibration: show the target in every part of the image (corners too), tilted 20–40° in "
             f"different directions, at working distance. Aim for {a.views} sharp views.")
    if a.images:
        frames: Iterable[np.ndarray] = (img for _, img in _images(a.images))
        source = f"images {a.images}"
    elif cfg.camera.source == "sim":
        from station.simline.calib_scene import CalibScene

        frames = CalibScene(cfg, spec, seed=a.seed).camera_views(a.views)
        source = "simulated line"
    else:
        frames = _live(cfg, a.views)
        source = f"live camera {cfg.camera.source}"
    dets = []
    for i, img in enumerate(frames, 1):
        d = det.detect(img)
        if d is not None:
            dets.append(d)
        _progress(i, a.views if not a.images else None, f"views ({len(dets)} with the target)")
    sys.stderr.write("\n")
    res = calibrate_camera(dets, (cfg.camera.width, cfg.camera.height), spec, source,
                           max_rms_px=cfg.calibration.max_reprojection_px)
    return _finish(a, cfg, "camera", res, "camera calibration")


def _geometry_for_tools(cfg, need_belt: bool = True):
    """The current calibration's geometry (for encoder/diverter tools, which measure in belt mm)."""
    from calibration.apply import geometry_from_calibration

    cal = CalibrationStore.from_config(cfg).load()
    if cal is None or cal.belt is None:
        raise CalibrationError("no belt calibration yet: run `kozan calibrate belt` first")
    return cal, geometry_from_calibration(cal, cfg)


def cmd_belt(a: argparse.Namespace) -> int:
    cfg = _cfg(a)
    spec = _spec(a)
    det = TargetDetector(spec)
    cal = CalibrationStore.from_config(cfg).load()
    K = dist = None
    if cal is not None and cal.camera is not None and not a.no_undistort:
        K, dist = np.asarray(cal.camera.camera_matrix), np.asarray(cal.camera.dist_coeffs)
        _say("using the lens model from the camera calibration")
    else:
        _say("warning: no camera calibration — lens distortion will not be corrected (run `kozan calibrate camera`)")
    _say("Belt calibration: lay the target flat on the stopped belt, its long side along the belt, its first row "
         f"of squares {a.target_y_mm:g} mm from the belt's near edge (--target-y-mm), fully in view.")
    covers = spec.size_mm[1] + a.target_y_mm >= 0.9 * cfg.line.belt_width_mm
    if a.images:
        _say(f"Reading {a.images}: the first image (by name) shows the target as just described; any further "
             "images show it slid elsewhere on the belt (across to the far edge), where it need not be measured.")
        imgs = [img for _, img in _images(a.images)]
        source = f"images {a.images}"
    elif cfg.camera.source == "sim":
        from station.simline.calib_scene import CalibScene

        scene = CalibScene(cfg, spec, seed=a.seed)
        imgs = [scene.render_on_belt(a.sim_x_mm, a.target_y_mm)]
        if a.sim_second_y_mm is not None:
            imgs.append(scene.render_on_belt(a.sim_x_mm + 20.0, a.sim_second_y_mm, 0.01))
        source = "simulated line"
    else:
        n = a.placements or (1 if covers else 2)
        if n > 1:
            _say(f"The target is narrower than the belt: {n} placements, the later ones slid across towards the "
                 "far edge (their position need not be measured; keep the target flat and in view).")
        prompts = [f"placement 1/{n}: first row {a.target_y_mm:g} mm from the near edge"] + \
                  [f"placement {i + 1}/{n}: slide the target across, towards the far edge" for i in range(1, n)]
        imgs = list(_live(cfg, n, prompts))
        source = f"live camera {cfg.camera.source}"
    dets = [d for d in (det.detect(i) for i in imgs) if d is not None]
    res = fit_belt(dets, (cfg.camera.width, cfg.camera.height), spec, source, K, dist, a.target_y_mm,
                   cfg.calibration.max_belt_residual_mm, cfg.line.belt_width_mm)
    return _finish(a, cfg, "belt", res, "belt-plane homography (pixel → mm)")


_COUNT_RE = re.compile(r"_c(-?\d+)\.[a-z]+$", re.I)


def cmd_encoder(a: argparse.Namespace) -> int:
    cfg = _cfg(a)
    if a.distance_mm is not None:
        if a.counts is None:
            _say("error: --distance-mm needs --counts START END (the encoder counts at both marks)")
            return 2
        c0, c1 = a.counts
        if c1 == c0:
            _say("error: the counts at both marks are equal: did the belt move?")
            return EXIT_BAD_DATA
        mpc = a.distance_mm / (c1 - c0)
        from calibration.record import EncoderSection

        sec = EncoderSection(method=f"target carried {a.distance_mm:g} mm between marks (tape measure)",
                             source="manual", mm_per_count=abs(mpc), residual_rms_mm=0.0,
                             spread_pct=100.0 * 1.0 / a.distance_mm, samples=2, travel_mm=a.distance_mm)
        return _finish(a, cfg, "encoder", Result(sec, [], [("mm per count", f"{abs(mpc):.6f}")]), "encoder scale")
    spec = _spec(a)
    det = TargetDetector(spec)
    _cal, geom = _geometry_for_tools(cfg)
    _say("Encoder calibration: lay the target on the belt upstream of the camera and run the belt slowly; "
         "frames stamped with the encoder count are tracked across the whole view.")
    if a.images:
        frames = []
        for p, img in _images(a.images):
            m = _COUNT_RE.search(p.name)
            if not m:
                raise CalibrationError(f"{p.name}: expected the encoder count in the name, e.g. frame_0001_c12345.png")
            frames.append((img, int(m.group(1))))
        source = f"images {a.images}"
    elif cfg.camera.source == "sim":
        from station.simline.calib_scene import CalibScene

        sc = CalibScene(cfg, spec, seed=a.seed)
        true_mpc = cfg.sim.true_mm_per_count or cfg.line.mm_per_count
        view = cfg.camera.width / cfg.camera.px_per_mm
        frames = []
        for travel in np.linspace(5.0, view - spec.size_mm[0] - 5.0, a.frames):
            c = int(np.floor(travel / true_mpc))
            frames.append((sc.render_on_belt(c * true_mpc + a.sim_phase_mm, a.target_y_mm), c))
        source = "simulated line"
    else:
        raise CalibrationError("live encoder tracking needs frames stamped with encoder counts: record them "
                               "(frame_<n>_c<count>.png) and pass --images, or use --distance-mm")
    samples = []
    for i, (img, c) in enumerate(frames, 1):
        d = det.detect(img)
        if d is not None and len(d) >= 12:
            samples.append((target_origin_mm(d, geom)[0], c))
        _progress(i, len(frames), "frames")
    sys.stderr.write("\n")
    res = fit_encoder(samples, source, f"{spec.describe()} tracked across {len(samples)} frames vs encoder counts")
    return _finish(a, cfg, "encoder", res, "encoder scale")


def cmd_diverters(a: argparse.Namespace) -> int:
    from calibration.diverters import LiveGateRig, SimGateRig, default_wiring, measure_diverters, parse_wiring

    cfg = _cfg(a)
    cal, geom = _geometry_for_tools(cfg)
    if cal.encoder is None:
        _say("warning: no encoder calibration — using the configured line.mm_per_count")
    spec = TargetSpec(4, 3, 25.0, 18.0, a.dictionary)      # the puck: a small target
    det = TargetDetector(spec)
    sim_cam, sim_link = cfg.camera.source == "sim", cfg.link.port == "sim"
    if sim_cam != sim_link:
        raise CalibrationError(
            "diverter calibration needs the station's own camera and MCU together: the camera sees the puck, "
            "the light gate at each diverter and the sensor on each actuator are wired to the MCU, which reports "
            "their edges over the serial protocol (InputEdge, firmware_bridge/PROTOCOL.md §6b). Set camera.source "
            "and link.port both to the real devices (or both to sim for the simulated line); without gates, "
            "measure by hand and set diverters[].position_mm and latency_ms in the station YAML "
            "(docs/CALIBRATION.md)")
    enabled = {d.id: d for d in cfg.diverters if d.enabled}
    ids = a.diverter or list(enabled)
    unknown = [d for d in ids if d not in enabled]
    if unknown:
        raise CalibrationError(f"diverter(s) {unknown} are not enabled in the configuration (enabled: {sorted(enabled)})")
    wiring = {d: default_wiring(d) for d in ids}
    wiring.update({d: w for d, w in parse_wiring(a.inputs).items() if d in wiring})
    ids = sorted(ids, key=lambda d: -enabled[d].position_mm)   # most downstream first: see measure_diverters
    _say(f"Diverter calibration: a puck (4×3 ChArUco, 25 mm squares) rides the belt through the camera view and "
         f"each diverter's light gate ({a.repeats} passes per diverter), then each diverter is fired {a.repeats} "
         "times; the MCU stamps the gate's and the actuator sensor's edges with its encoder count and clock.")
    _say("inputs: " + ", ".join(f"diverter {d}: gate {wiring[d].gate}, actuator sensor {wiring[d].sensor}"
                                 for d in ids))
    if sim_cam:
        rig = SimGateRig(cfg, spec, {d: default_wiring(d) for d in enabled}, seed=a.seed)   # wired by convention
        source = "simulated line (serial link, gate inputs)"
    else:
        _say("Print the puck with `kozan calibrate target --squares-x 4 --squares-y 3 --square-mm 25 --marker-mm "
             "18`. The belt is started by the tool; keep clear of the diverters — they will fire.")
        rig = LiveGateRig(cfg, _say)
        source = f"live camera {cfg.camera.source}, MCU {cfg.link.port}"
    try:
        runs = measure_diverters(rig, ids, a.repeats, wiring, det, geom, spec.size_mm[0],
                                 progress=lambda i, n, what: _progress(i, n, what))
    finally:
        sys.stderr.write("\n")
        rig.close()
    res = fit_diverters(runs, geom.mm_per_count, cfg.line.decision_line_mm, source,
                        method="puck through the camera view + the MCU-stamped light gate at each diverter "
                               "(position); fire_now + the MCU-stamped actuator sensor (latency = sensor edge - "
                               "Fired, MCU clock)")
    return _finish(a, cfg, "diverters", res, "diverter positions and latencies")


def cmd_check(a: argparse.Namespace) -> int:
    cfg = _cfg(a)
    store = CalibrationStore.from_config(cfg)
    try:
        cal = store.load()
    except CalibrationError as e:
        _say(str(e))
        return 1
    if cal is None:
        _say(f"no calibration at {store.active}" + (" — the simulated line uses its configured scale" if
                                                     cfg.camera.source == "sim" else " — the station will refuse to run"))
        _say("run: kozan calibrate target, camera, belt, encoder, diverters")
        return 0 if cfg.camera.source == "sim" else 1
    rows = [("file", f"{store.active} (version {cal.version}, written {cal.written_at})")]
    for name in ("camera", "belt", "encoder", "diverters"):
        s = getattr(cal, name)
        if s is None:
            rows.append((name, "missing"))
            continue
        rows.append((name, f"{s.measured_at}  ({s.source})" if s.source else s.measured_at))
        rows += [("", line) for line in textwrap.wrap(s.method, 78)]      # wrapped, never cut
    if cal.camera:
        rows.append(("  reprojection RMS", f"{cal.camera.rms_px:.3f} px"))
    if cal.belt:
        rows.append(("  belt residual max", f"{cal.belt.residual_max_mm:.3f} mm"))
    if cal.encoder:
        rows.append(("  mm per count", f"{cal.encoder.mm_per_count:.6f} (± {cal.encoder.spread_pct:.3f} %)"))
    if cal.diverters:
        for d in cal.diverters.diverters:
            rows.append((f"  diverter {d.id}", f"{d.position_mm:.1f} mm ± {d.position_spread_mm:.2f}, "
                                               f"latency {d.latency_ms:.1f} ms ± {d.latency_spread_ms:.2f}"))
    _table("active calibration", rows)
    probs = find_problems(cal, cfg)
    _say("\nproblems:" if probs else "\nno problems found")
    for p in probs:
        _say(f"  - {p}")
    return 1 if any(p.severity == "error" for p in probs) else 0


def cmd_history(a: argparse.Namespace) -> int:
    cfg = _cfg(a)
    store = CalibrationStore.from_config(cfg)
    if a.rollback is not None:
        if not a.yes:
            ans = input(f"make version {a.rollback} active again (the current one is kept)? [y/N] ")
            if ans.strip().lower() not in ("y", "yes"):
                _say("not changed")
                return 1
        new = store.rollback(a.rollback)
        _say(f"version {a.rollback} is active again (as version {new.version})")
        return 0
    vs = store.versions()
    if not vs:
        _say(f"no calibrations yet ({store.active})")
        return 0
    _table("calibration versions", [(f"{'*' if v.active else ' '} v{v.version}",
                                     f"{v.written_at}  {','.join(v.sections):<30} {v.note}") for v in vs])
    return 0


def _run(func):
    def wrapped(a: argparse.Namespace) -> int:
        try:
            return func(a)
        except CalibrationError as e:
            _say(f"calibration error: {e}")
            return 2
    return wrapped


def add_calibrate_commands(sub) -> None:
    """Register `kozan calibrate ...` on the main parser's subcommands."""
    cal = sub.add_parser("calibrate", help="technicians' calibration tools (camera, belt, encoder, diverters)")
    csub = cal.add_subparsers(dest="calib_cmd", required=True)

    def common(sp: argparse.ArgumentParser, target: bool = True) -> None:
        sp.add_argument("--config", "-c", default=None, help="station YAML (default: the simulated line)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting")
        sp.add_argument("--yes", "-y", action="store_true", help="write without asking (scripts, tests)")
        sp.add_argument("--seed", type=int, default=1, help="simulated line only")
        if target:
            sp.add_argument("--squares-x", type=int, default=12)
            sp.add_argument("--squares-y", type=int, default=8)
            sp.add_argument("--square-mm", type=float, default=30.0)
            sp.add_argument("--marker-mm", type=float, default=22.0)
        sp.add_argument("--dictionary", default="5x5_100")

    t = csub.add_parser("target", help="write the printable ChArUco target (PNG and PDF) at a known scale")
    common(t)
    t.add_argument("--out", default="var/calibration/target")
    t.add_argument("--dpi", type=float, default=300.0)
    t.set_defaults(func=_run(cmd_target))

    c = csub.add_parser("camera", help="lens intrinsics and distortion from target views")
    common(c)
    c.add_argument("--images", default=None, help="a folder of target images instead of the camera")
    c.add_argument("--views", type=int, default=16)
    c.set_defaults(func=_run(cmd_camera))

    b = csub.add_parser("belt", help="belt-plane homography (pixel → mm) from a target lying on the belt")
    common(b)
    b.add_argument("--images", default=None)
    b.add_argument("--target-y-mm", type=float, default=60.0, help="target's first row from the belt's near edge")
    b.add_argument("--sim-x-mm", type=float, default=150.0, help="simulated line: where the target lies")
    b.add_argument("--sim-second-y-mm", type=float, default=None,
                   help="simulated line: lay the target a second time, first row this far from the near edge")
    b.add_argument("--placements", type=int, default=None,
                   help="live camera: target placements across the belt (default: 2 when the target is narrower "
                        "than the belt)")
    b.add_argument("--no-undistort", action="store_true", help="ignore the camera calibration")
    b.set_defaults(func=_run(cmd_belt))

    e = csub.add_parser("encoder", help="mm per encoder count")
    common(e)
    e.add_argument("--images", default=None, help="frames named ..._c<count>.png")
    e.add_argument("--distance-mm", type=float, default=None, help="known distance the belt carried a mark")
    e.add_argument("--counts", type=int, nargs=2, default=None, metavar=("START", "END"))
    e.add_argument("--frames", type=int, default=12)
    e.add_argument("--target-y-mm", type=float, default=60.0)
    e.add_argument("--sim-phase-mm", type=float, default=-40.0, help=argparse.SUPPRESS)
    e.set_defaults(func=_run(cmd_encoder))

    d = csub.add_parser("diverters", help="diverter positions and actuator latencies (fire and observe)")
    common(d, target=False)
    d.add_argument("--repeats", type=int, default=4)
    d.add_argument("--diverter", type=int, action="append", help="only this diverter (repeatable)")
    d.add_argument("--inputs", action="append", metavar="D:GATE:SENSOR",
                   help="MCU inputs of diverter D's light gate and actuator sensor (default 2D and 2D+1; repeatable)")
    d.set_defaults(func=_run(cmd_diverters))

    k = csub.add_parser("check", help="validate the active calibration: missing, stale, out of tolerance")
    common(k, target=False)
    k.set_defaults(func=_run(cmd_check))

    h = csub.add_parser("history", help="list calibration versions; --rollback N makes one active again")
    common(h, target=False)
    h.add_argument("--rollback", type=int, default=None, metavar="N")
    h.set_defaults(func=_run(cmd_history))
