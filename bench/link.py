"""The diverter link over a real pseudo-terminal: command round-trip time and watchdog time-to-safe.

    .venv/bin/python bench/link.py [--commands 2000] [--watchdog-trials 5] [--only python-sim|c-core]
                                   [--clock-seconds 10] [--clock-only] [--json PATH]

For each MCU implementation (the Python firmware simulator, and the C firmware core built for the host
with gcc into a temp dir), on a real-time belt at 1000 counts/s:

* **Ack RTT**: a FireAt for a far-future count is sent through the real ``DiverterLink``; the time from
  ``fire_at()`` until the link's I/O thread has processed the Ack (``wait_settled`` returns) is one
  sample. The command is then cancelled (not timed), so the queue never fills. Median and p99.
* **Watchdog time-to-safe**: with a command queued and (C core) an output held on by a long FireNow
  pulse, the host stops sending. Measured from the host's last frame written to the port until
  (a) the ``Fault(WATCHDOG)`` is received by the host, and (b) for the C core, the output-off line
  arrives from the firmware process. The rule is 250 ms of silence; what this adds is the MCU's
  poll granularity plus the way back.
* **MCU clock sync** (PROTOCOL.md §7a): the link runs for ``--clock-seconds`` with the station's default
  20 ms EncoderReports; printed are the host's estimate of the MCU clock's drift (ppm) and offset, and the
  residuals (µs) of the reports' receive times against the estimate (median, p99: the transport's jitter
  above its minimum). The Python simulator is given a +200 ppm crystal and a 7 s offset, so the estimate is
  also checked against the truth (``map_err``: estimated minus true MCU time at host instants, sampled every
  100 ms after the first 2 s). The C core's host build runs on the host's own CLOCK_MONOTONIC: drift ≈ 0.

Benchmarks measure; nothing here asserts. Prints a table, then one JSON line (or writes ``--json``).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from firmware_bridge import (  # noqa: E402
    AckEvent,
    ConstantSpeedEnvironment,
    DiverterLink,
    DiverterSetup,
    FaultCode,
    FaultEvent,
    FiredEvent,
    FirmwareSimulator,
)
from firmware_bridge.messages import EventAck, Message, MsgType  # noqa: E402
from firmware_bridge.native import NativeFirmware, NativeFirmwareError, build_host_firmware  # noqa: E402

COUNTS_PER_S = 1000.0
SIM_DRIFT_PPM = 200.0
SIM_OFFSET_US = 7_000_000
DIVERTERS = [DiverterSetup(0, 0, 100), DiverterSetup(1, 0, 60_000)]


class TimedLink(DiverterLink):
    """A DiverterLink that remembers when it last wrote a frame (the start of a silence).

    With heartbeats off, the EventAcks the link writes for the trip's own events (``Ended``, ``Fault``)
    come after the trip and do not count: v2 acks every event, and counting them would end the silence
    at the Fault itself (a measured 0 ms).
    """

    last_send_s = 0.0

    def _send(self, msg: Message) -> int:
        seq = super()._send(msg)
        if self.heartbeats_enabled or not isinstance(msg, EventAck):
            self.last_send_s = time.monotonic()
        return seq


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, int(round(p / 100.0 * (len(ordered) - 1)))))
    return ordered[k]


def serve(kind: str, binary: Path | None) -> Any:
    if kind == "python-sim":
        return FirmwareSimulator.on_new_pty(ConstantSpeedEnvironment(mm_per_count=0.5, speed_mm_s=500.0))
    assert binary is not None
    return NativeFirmware(binary, counts_per_s=COUNTS_PER_S)


def wait_for(link: DiverterLink, pred: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in link.poll_events():
            if pred(ev):
                return ev
        time.sleep(0.0005)
    return None


def measure_rtt(kind: str, binary: Path | None, n: int) -> dict[str, Any]:
    rtts: list[float] = []
    failures = 0
    with serve(kind, binary) as mcu, DiverterLink(mcu.slave_path) as link:
        link.configure(0.5, DIVERTERS, watchdog_ms=1000)
        time.sleep(0.2)
        far = int(link.belt_clock.count_at(time.monotonic())) + 10_000_000
        for i in range(n):
            cid = 1000 + i
            t0 = time.monotonic()
            link.fire_at(cid, 0, far + i, 10)
            if not link.wait_settled(1.0):
                failures += 1
                continue
            rtts.append(time.monotonic() - t0)
            link.cancel(cid)
            if wait_for(link, lambda e, c=cid: isinstance(e, AckEvent) and e.command_id == c
                        and e.msg_type == MsgType.CANCEL, 1.0) is None:
                failures += 1
        health = link.health()
    ms = [r * 1000.0 for r in rtts]
    return {
        "samples": len(ms),
        "failures": failures,
        "median_ms": statistics.median(ms) if ms else None,
        "p99_ms": percentile(ms, 99) if ms else None,
        "max_ms": max(ms) if ms else None,
        "retries": health["retries"],
        "link_rtt_median_ms": health["rtt_ms"],
    }


def measure_watchdog(kind: str, binary: Path | None, trials: int) -> dict[str, Any]:
    fault_ms: list[float] = []
    off_ms: list[float] = []
    with serve(kind, binary) as mcu, TimedLink(mcu.slave_path) as link:
        link.configure(0.5, DIVERTERS, watchdog_ms=250)
        time.sleep(0.1)
        for t in range(trials):
            link.heartbeats_enabled = True
            time.sleep(0.15)
            now_count = int(link.belt_clock.count_at(time.monotonic()))
            link.fire_at(10 * t + 1, 0, now_count + 1_000_000, 10)
            if isinstance(mcu, NativeFirmware):
                link.fire_now(10 * t + 2, 1, 60_000)  # hold an output on through the silence
            link.wait_settled(1.0)
            if isinstance(mcu, NativeFirmware):  # its Fired is acked before the silence, not during it
                wait_for(link, lambda e, c=10 * t + 2: isinstance(e, FiredEvent) and e.command_id == c, 1.0)
                time.sleep(0.06)
            link.poll_events()
            switches_before = len(mcu.switches) if isinstance(mcu, NativeFirmware) else 0
            link.heartbeats_enabled = False
            fault = wait_for(link, lambda e: isinstance(e, FaultEvent) and e.code == FaultCode.WATCHDOG, 2.0)
            if fault is None:
                continue
            silent_since = link.last_send_s
            fault_ms.append((fault.host_time_s - silent_since) * 1000.0)
            if isinstance(mcu, NativeFirmware):
                off = next((s for s in mcu.switches[switches_before:] if not s.on and s.diverter == 1), None)
                if off is not None:
                    off_ms.append((off.host_time_s - silent_since) * 1000.0)
        link.heartbeats_enabled = True
    return {
        "trials": trials,
        "watchdog_ms": 250,
        "fault_received_ms": {"median": statistics.median(fault_ms), "max": max(fault_ms)} if fault_ms else None,
        "outputs_off_ms": {"median": statistics.median(off_ms), "max": max(off_ms)} if off_ms else None,
    }


def measure_clock(kind: str, binary: Path | None, seconds: float) -> dict[str, Any]:
    env = None
    if kind == "python-sim":
        env = ConstantSpeedEnvironment(mm_per_count=0.5, speed_mm_s=500.0)
        served: Any = FirmwareSimulator.on_new_pty(env, clock_drift_ppm=SIM_DRIFT_PPM, clock_offset_us=SIM_OFFSET_US)
    else:
        assert binary is not None
        served = NativeFirmware(binary, counts_per_s=COUNTS_PER_S)
    map_err_us: list[float] = []
    with served as mcu, DiverterLink(mcu.slave_path) as link:
        link.configure(0.5, DIVERTERS, watchdog_ms=1000, report_interval_ms=20)
        t_start = time.monotonic()
        while time.monotonic() - t_start < seconds:
            time.sleep(0.1)
            if env is None or time.monotonic() - t_start < 2.0 or not link.mcu_clock.ready:
                continue
            t = time.monotonic()
            truth = SIM_OFFSET_US + (t - env._t0) * 1e6 * (1 + SIM_DRIFT_PPM * 1e-6)
            map_err_us.append(link.mcu_clock.mcu_time_us_at(t) - truth)
        est = link.mcu_clock.estimate()
    out: dict[str, Any] = {
        "seconds": seconds,
        "samples": est.samples,
        "drift_ppm": est.drift_ppm,
        "offset_us": est.offset_us,
        "residual_median_us": est.residual_median_us,
        "residual_p99_us": est.residual_p99_us,
        "true_drift_ppm": SIM_DRIFT_PPM if env is not None else 0.0,
    }
    if map_err_us:
        abs_err = [abs(e) for e in map_err_us]
        out["map_err_us"] = {"median": statistics.median(map_err_us), "abs_p99": percentile(abs_err, 99),
                             "abs_max": max(abs_err)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", type=int, default=2000, help="FireAt round trips per implementation")
    ap.add_argument("--watchdog-trials", type=int, default=5)
    ap.add_argument("--only", choices=["python-sim", "c-core"], help="bench one implementation")
    ap.add_argument("--clock-seconds", type=float, default=10.0, help="run time of the clock-sync section")
    ap.add_argument("--clock-only", action="store_true", help="only the clock-sync section")
    ap.add_argument("--json", type=Path, help="write the results here instead of printing the JSON line")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the watchdog trips on purpose: keep its warnings out

    kinds = [args.only] if args.only else ["python-sim", "c-core"]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kozan-bench-link-") as tmp:
        binary = None
        if "c-core" in kinds:
            try:
                binary = build_host_firmware(Path(tmp))
            except NativeFirmwareError as exc:
                print(f"skipping c-core: {exc}", file=sys.stderr)
                kinds.remove("c-core")
        for kind in kinds:
            results[kind] = {} if args.clock_only else {
                "rtt": measure_rtt(kind, binary, args.commands),
                "watchdog": measure_watchdog(kind, binary, args.watchdog_trials),
            }
            results[kind]["clock"] = measure_clock(kind, binary, args.clock_seconds)

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:8.2f}"

    if not args.clock_only:
        print(f"{'mcu':<11} {'n':>5} {'rtt p50 ms':>10} {'rtt p99 ms':>10} {'rtt max':>8} "
              f"{'wd fault ms':>11} {'wd off ms':>9}")
    for kind, r in results.items():
        if args.clock_only:
            break
        rtt, wd = r["rtt"], r["watchdog"]
        fault = wd["fault_received_ms"]["median"] if wd["fault_received_ms"] else None
        off = wd["outputs_off_ms"]["median"] if wd["outputs_off_ms"] else None
        print(f"{kind:<11} {rtt['samples']:>5} {fmt(rtt['median_ms']):>10} {fmt(rtt['p99_ms']):>10} "
              f"{fmt(rtt['max_ms']):>8} {fmt(fault):>11} {fmt(off):>9}")
    print(f"\nMCU clock sync ({args.clock_seconds:.0f} s, 20 ms reports)")
    print(f"{'mcu':<11} {'n':>5} {'drift ppm':>10} {'(true)':>7} {'offset us':>14} {'resid p50 us':>12} "
          f"{'resid p99 us':>12} {'map err p50/|p99| us':>21}")
    for kind, r in results.items():
        c = r["clock"]
        m = c.get("map_err_us")
        merr = f"{m['median']:.0f} / {m['abs_p99']:.0f}" if m else "-"
        print(f"{kind:<11} {c['samples']:>5} {c['drift_ppm']:>10.1f} {c['true_drift_ppm']:>7.0f} "
              f"{c['offset_us']:>14.0f} {c['residual_median_us']:>12.1f} {c['residual_p99_us']:>12.1f} {merr:>21}")
    out = {"bench": "link", "counts_per_s": COUNTS_PER_S, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    else:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
