"""`kozan firmware ...`: the technician's tools for the diverter MCU (PROTOCOL.md).

    kozan firmware ports                     serial ports, Kozan-looking ones marked
    kozan firmware ping   [--port P] [-n N]  round-trip statistics (Identify -> Hello; changes nothing)
    kozan firmware status [--port P]         Hello, Status, belt speed and link health
    kozan firmware fire N [--port P] [--pulse-ms MS] [--yes]
                                             fire diverter N now (asks for confirmation)

`--port` defaults to the configuration's `link.port`. `sim` serves the firmware simulator on a fresh
pseudo-terminal (a constant-speed belt), so every command can be tried without hardware. The station must
not be running on the same port: one program owns a serial port.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

#: USB vendor ids of boards the reference firmware runs on (Raspberry Pi RP2040) or that carry USB-serial
#: bridges often wired to an MCU (FTDI, Silicon Labs, WCH).
LIKELY_VIDS = {0x2E8A: "Raspberry Pi (RP2040)", 0x0403: "FTDI", 0x10C4: "Silicon Labs", 0x1A86: "WCH"}
#: Command ids for technicians' fires: far above the station's counter, so that the MCU's de-duplication
#: (it remembers the answers to the last 1024 ids of a boot) never confuses the two.
TECH_ID_BASE = 0xF000_0000


def _port(a: argparse.Namespace) -> str:
    if a.port:
        return str(a.port)
    from station.cli import _load

    return str(_load(a).link.port)


class _Opened:
    """A DiverterLink on the port, or on a simulator started for it (`sim`); closes both."""

    def __init__(self, a: argparse.Namespace) -> None:
        from firmware_bridge import ConstantSpeedEnvironment, DiverterLink, FirmwareSimulator

        self.sim = None
        port = _port(a)
        if port == "sim":
            self.sim = FirmwareSimulator.on_new_pty(ConstantSpeedEnvironment(mm_per_count=0.1, speed_mm_s=500.0))
            self.sim.start()
            port = str(self.sim.slave_path)
        self.port = port
        self.link = DiverterLink(port, baudrate=a.baudrate)

    def __enter__(self) -> Any:
        try:
            self.link.open(timeout=self._timeout)
        except Exception:
            self.close()
            raise
        return self.link

    _timeout = 3.0

    def close(self) -> None:
        try:
            self.link.close()
        finally:
            if self.sim is not None:
                self.sim.stop()

    def __exit__(self, *exc: object) -> None:
        self.close()


def cmd_ports(a: argparse.Namespace) -> int:
    from serial.tools import list_ports

    ports = sorted(list_ports.comports(), key=lambda p: p.device)
    rows = []
    for p in ports:
        likely = LIKELY_VIDS.get(p.vid) if p.vid is not None else None
        rows.append({"device": p.device, "description": p.description, "hwid": p.hwid,
                     "likely_mcu": likely})
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no serial ports found. Plug the MCU in (USB), check `dmesg | tail`, and that your user is in "
              "the dialout group; `--port sim` tries the tools against the firmware simulator.")
        return 1
    for r in rows:
        mark = f"  <- {r['likely_mcu']}" if r["likely_mcu"] else ""
        print(f"{r['device']:<20} {r['description']}  [{r['hwid']}]{mark}")
    return 0


def cmd_ping(a: argparse.Namespace) -> int:
    from firmware_bridge import LinkError

    rtts: list[float] = []
    lost = 0
    try:
        with _Opened(a) as link:
            for _ in range(a.count):
                rtt = link.ping(timeout=0.5)
                if rtt is None:
                    lost += 1
                else:
                    rtts.append(rtt * 1000.0)
                time.sleep(a.interval)
            health = link.health()
    except LinkError as e:
        print(f"ping failed: {e}", file=sys.stderr)
        return 1
    ordered = sorted(rtts)
    out = {
        "port": _port(a), "sent": a.count, "answered": len(rtts), "lost": lost,
        "rtt_ms": None if not rtts else {
            "min": round(ordered[0], 3), "median": round(statistics.median(ordered), 3),
            "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3),
            "max": round(ordered[-1], 3)},
        "crc_errors": health["crc_errors"], "resyncs": health["resyncs"],
    }
    if a.json:
        print(json.dumps(out))
    elif rtts:
        r = out["rtt_ms"]
        print(f"{len(rtts)}/{a.count} answered; round trip min {r['min']:.2f} / median {r['median']:.2f} / "
              f"p99 {r['p99']:.2f} / max {r['max']:.2f} ms; crc errors {health['crc_errors']}, "
              f"resyncs {health['resyncs']}")
    else:
        print(f"no answer to {a.count} pings on {out['port']}")
    return 0 if rtts and not lost else 1


def cmd_status(a: argparse.Namespace) -> int:
    from firmware_bridge import LinkError

    try:
        with _Opened(a) as link:
            deadline = time.monotonic() + 1.0  # the MCU sends Status every 500 ms
            while link.mcu_status is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.15)  # a few encoder reports for the speed
            hello = link.hello
            status = link.mcu_status
            bc = link.belt_clock
            cps = bc.counts_per_s if bc.ready else None  # a property: calling it was a swallowed TypeError
            health = link.health()
    except LinkError as e:
        print(f"status failed: {e}", file=sys.stderr)
        return 1
    out = {
        "port": _port(a),
        "boot_id": f"{hello.boot_id:08x}" if hello else None,
        "firmware": f"{hello.fw_version >> 8}.{hello.fw_version & 0xFF}" if hello else None,
        "protocol": hello.protocol_version if hello else None,
        "config_crc": f"{hello.config_crc:08x}" if hello else None,
        "configured": bool(hello and hello.config_crc),
        "status": None if status is None else {
            "queue_depth": status.queue_depth, "estop": status.estop, "configured": status.configured,
            "watchdog_tripped": status.watchdog_tripped, "events_pending": status.events_pending,
            "events_dropped": status.events_dropped, "armed": status.armed, "belt_running": status.belt_running},
        "belt_counts_per_s": cps,
        "mcu_clock": health["clock"],
        "link": {k: health[k] for k in ("rtt_ms", "crc_errors", "resyncs", "frames_rx", "bad_messages",
                                        "reconnects")},
    }
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"MCU on {out['port']}: boot {out['boot_id']}, firmware {out['firmware']}, protocol v{out['protocol']}, "
          f"config crc {out['config_crc']} ({'configured' if out['configured'] else 'NOT configured'})")
    if status is None:
        print("no Status received within 1 s")
    else:
        print(f"queue {status.queue_depth}, e-stop {'PRESSED' if status.estop else 'released'}"
              f"{'' if status.armed else ' (NOT re-armed: reset the line on the HMI)'}, watchdog "
              f"{'TRIPPED' if status.watchdog_tripped else 'ok'}, belt {'running' if status.belt_running else 'stopped'}"
              f", events pending {status.events_pending}, dropped {status.events_dropped}")
    print(f"belt: {'unknown' if cps is None else f'{cps:.1f} counts/s'}; link: {out['link']}")
    return 0


def cmd_fire(a: argparse.Namespace) -> int:
    from firmware_bridge import DiverterSetup, FiredEvent, LinkError, NakEvent
    from station.cli import _load

    cfg = _load(a)
    div = next((d for d in cfg.diverters if d.id == a.diverter), None)
    if div is None:
        print(f"diverter {a.diverter} is not in the configuration (ids: {[d.id for d in cfg.diverters]})",
              file=sys.stderr)
        return 2
    pulse = a.pulse_ms if a.pulse_ms is not None else div.pulse_ms
    if not a.yes:
        answer = input(f"fire diverter {a.diverter} on {_port(a)} now for {pulse:.0f} ms? Keep hands clear of the "
                       "belt. Type 'yes' to fire: ")
        if answer.strip().lower() != "yes":
            print("not fired")
            return 1
    try:
        with _Opened(a) as link:
            # The MCU needs a configuration to fire; the station's own (identical: harmless to a running MCU).
            link.configure(cfg.line.mm_per_count,
                           [DiverterSetup(d.id, int(round(d.latency_ms * 1000)), int(round(d.max_on_ms)))
                            for d in cfg.diverters if d.enabled],
                           watchdog_ms=cfg.link.watchdog_ms, report_interval_ms=cfg.link.report_interval_ms)
            cid = TECH_ID_BASE + int(time.time()) % 0x0FFF_FFFF
            link.fire_now(cid, a.diverter, pulse)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for ev in link.poll_events():
                    if isinstance(ev, FiredEvent) and ev.command_id == cid:
                        print(f"fired diverter {ev.diverter} at belt count {ev.actual_count} (command {cid})")
                        return 0
                    if isinstance(ev, NakEvent) and ev.command_id == cid:
                        print(f"the MCU refused: {ev.reason.name}", file=sys.stderr)
                        return 1
                time.sleep(0.01)
    except LinkError as e:
        print(f"fire failed: {e}", file=sys.stderr)
        return 1
    print("no Fired report within 2 s: check `kozan firmware status`", file=sys.stderr)
    return 1


def add_firmware_commands(sub: Any) -> None:
    fw = sub.add_parser("firmware", help="diverter MCU tools: ports, ping, status, fire")
    fsub = fw.add_subparsers(dest="firmware_cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", default=None, help="station YAML (default: the simulated line)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting")
        sp.add_argument("--port", "-p", default=None, help="serial port or pyserial URL; `sim` = simulator "
                        "(default: the configuration's link.port)")
        sp.add_argument("--baudrate", type=int, default=250_000)
        sp.add_argument("--json", action="store_true", help="print JSON")

    p = fsub.add_parser("ports", help="list serial ports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ports)
    p = fsub.add_parser("ping", help="round-trip statistics (Identify -> Hello)")
    common(p)
    p.add_argument("-n", "--count", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.01, help="seconds between pings")
    p.set_defaults(func=cmd_ping)
    p = fsub.add_parser("status", help="Hello, Status, belt speed, link health")
    common(p)
    p.set_defaults(func=cmd_status)
    p = fsub.add_parser("fire", help="fire one diverter now (asks for confirmation)")
    common(p)
    p.add_argument("diverter", type=int, help="diverter id")
    p.add_argument("--pulse-ms", type=float, default=None, help="default: the diverter's configured pulse")
    p.add_argument("--yes", action="store_true", help="do not ask (scripts)")
    p.set_defaults(func=cmd_fire)
