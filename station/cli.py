"""The `kozan` command line.

    kozan run                 the station in real time (the simulated line unless configured)
    kozan sim --items N ...   the simulated line in virtual time, judged; one JSON object
    kozan config --defaults   the default configuration as YAML
    kozan dataset ... / kozan model ...   data and models (cli_model)
    kozan firmware ports|ping|status|fire N   diverter MCU tools (cli_firmware)
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time

from calibration.store import CalibrationError
from station.cli_model import add_model_commands
from station.config import ConfigError, dump_defaults, load_config


def _load(a: argparse.Namespace):
    cfg = load_config(a.config)
    for item in a.set or []:
        cfg = _override(cfg, item)
    return cfg


def _override(cfg, item: str):
    """`--set section.key=value`: a one-off change without editing the file (validated the same way)."""
    from station.config import config_from_dict
    import yaml

    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    data = cfg.model_dump(mode="json")
    node = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node, dict) or p not in node:
            raise ConfigError(f"--set {item!r}: no section {p!r}")
        node = node[p]
    node[parts[-1]] = yaml.safe_load(raw)
    return config_from_dict(data, f"--set {item}")


def _refuse_bad_calibration(cfg) -> None:
    """Raise CalibrationError (main prints it) when the station would refuse its calibration."""
    from calibration.apply import check_for_station

    check_for_station(cfg)


def cmd_run(a: argparse.Namespace) -> int:
    from station.runtime import Station

    cfg = _load(a)
    _refuse_bad_calibration(cfg)      # before the camera, link and records are opened
    st = Station(cfg)
    stop = {"flag": False}

    def on_signal(signum, frame):  # Ctrl-C: finish the frame in hand, then close everything
        stop["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    st.start()
    hmi = None
    if cfg.hmi.enabled:
        from station.hmi import HmiServer

        try:
            hmi = HmiServer(st, cfg.hmi)
            print(f"HMI: {hmi.start()}", flush=True)
        except OSError as e:   # the line runs without its screen rather than not at all; say so loudly
            hmi = None
            print(f"warning: {e}", file=sys.stderr, flush=True)
    t_end = time.monotonic() + a.duration if a.duration else None
    tty = sys.stdout.isatty()
    try:
        while not stop["flag"] and (t_end is None or time.monotonic() < t_end):
            time.sleep(cfg.hmi.status_interval_s)
            line = st.status_line()
            print(("\r" + line + "   ") if tty else line, end="" if tty else "\n", flush=True)
            if st.state.state.value == "fault":
                print(f"\nline fault: {st.state.reason}", file=sys.stderr)
                break
    finally:
        print("\nstopping...", flush=True)
        if hmi is not None:
            hmi.stop()
        st.stop()
    c = st.core.counters
    print(json.dumps({"decided": c.decided, "per_bin": {str(k): v for k, v in c.per_bin.items()},
                      "missed": c.missed, "frames": c.frames, "dropped_frames": st.mailbox.dropped}))
    return 1 if st.state.state.value == "fault" else 0


def cmd_sim(a: argparse.Namespace) -> int:
    from station.simrun import run_fast

    cfg = _load(a)
    if a.seed is not None:
        cfg.sim.seed = a.seed
    if a.speed is not None:
        cfg.line.belt_speed_mm_s = a.speed
    if not a.fast:
        print("error: only --fast (virtual time) is a judged batch run; use `kozan run` for real time",
              file=sys.stderr)
        return 2
    _refuse_bad_calibration(cfg)

    def progress(world, core):
        sys.stderr.write(f"\rsim: {world.spawned}/{a.items} items spawned, {core.counters.decided} decided")
        sys.stderr.flush()

    rep = run_fast(cfg, a.items, seed=cfg.sim.seed, records_path=a.records, progress=None if a.quiet else progress,
                   oracle=a.oracle)
    if not a.quiet:
        sys.stderr.write("\n")
    if a.json:
        print(json.dumps(rep, indent=None if a.compact else 1))
    else:
        print(f"items {rep['items']}  purity {rep['purity']}  recovery {rep['recovery']}  missed {rep['missed']}  "
              f"frames {rep['frames']}  wall {rep['wall_s']} s  ({rep['speedup']}x real time)")
        for b, v in rep["per_bin"].items():
            print(f"  bin {b} {v['name']:<22} items {v['items']:5d}  purity {v['purity']}  recovery {v['recovery']}")
    return 0


def cmd_config(a: argparse.Namespace) -> int:
    if a.defaults:
        print(dump_defaults(), end="")
        return 0
    cfg = _load(a)
    print(f"configuration OK: {len(cfg.diverters)} diverters, camera {cfg.camera.source}, link {cfg.link.port}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kozan", description="Kozan sorting-station controller")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (every item's decisions)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", default=None, help="station YAML (default: the simulated line)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override one setting, e.g. --set line.belt_speed_mm_s=1000")

    r = sub.add_parser("run", help="run the station in real time (Ctrl-C stops it cleanly)")
    with_config(r)
    r.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sim", help="run the simulated line and judge it against ground truth")
    with_config(s)
    s.add_argument("--items", type=int, default=300)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--speed", type=float, default=None, help="belt speed, mm/s")
    s.add_argument("--fast", action="store_true", help="virtual time: as fast as the machine allows")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--compact", action="store_true", help="JSON on one line")
    s.add_argument("--records", default=None, help="keep the run's SQLite records here")
    s.add_argument("--quiet", "-q", action="store_true")
    s.add_argument("--oracle", action="store_true",
                   help="detect from ground truth instead of the model: judges everything after detection")
    s.set_defaults(func=cmd_sim)

    c = sub.add_parser("config", help="check a configuration, or print the defaults")
    with_config(c)
    c.add_argument("--defaults", action="store_true")
    c.set_defaults(func=cmd_config)

    add_model_commands(sub)
    __import__("station.cli_firmware").cli_firmware.add_firmware_commands(sub)   # kozan firmware ...
    __import__("calibration.cli").cli.add_calibrate_commands(sub)   # kozan calibrate ...
    __import__("station.plant.cli").plant.cli.add_plant_commands(sub)   # kozan plant (aggregator)
    __import__("station.reporting.cli").reporting.cli.add_records_commands(sub)   # kozan report|lot|records ...
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except CalibrationError as e:   # the station refuses it: say what to re-measure, no traceback
        print(f"calibration error: the station will not run on this calibration.\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
