"""What the HMI costs the line: loop frame rate and latency with the HMI closed and open.

    .venv/bin/python bench/hmi.py [--seconds 20] [--rounds 2] [--seed 1] [--set key=value ...]

One real-time station on the simulated line (the seed fixed, default configuration) runs
throughout; its time is cut into windows that alternate between the HMI closed (no server, no
frame hook) and open (the HMI served and a client streaming it the way the page does: server-sent
events, every new live-view JPEG and every thumbnail fetched). The client is a separate process,
as a browser would be. Alternating short windows in one run, rather than one long run per mode,
makes a change in the machine's load (other jobs) hit both modes alike. Figures per mode: the
loop's frames per second (frames processed / seconds) and the median of the latency p50 readings
of `Station.stats`, averaged over the windows. Target: the open HMI costs at most 5 %.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def client(url: str) -> None:
    """Act like the page: follow the event stream, fetch each new live view and new thumbnails."""
    import httpx

    seen_seq, thumbs = -1, set()
    fetched = 0
    with httpx.Client(timeout=30) as c, c.stream("GET", url + "api/events") as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            snap = json.loads(line[6:])
            if snap["preview_seq"] != seen_seq and snap["preview_seq"] > 0:
                seen_seq = snap["preview_seq"]
                if c.get(url + "api/preview.jpg").status_code == 200:
                    fetched += 1
            for it in snap["recent"]:
                if it["thumb"] and it["track_id"] not in thumbs:
                    thumbs.add(it["track_id"])
                    c.get(url + f"api/thumb/{it['track_id']}.jpg")


def window(st: Any, seconds: float) -> dict[str, float]:
    """The loop's frame rate and median latency p50 over one window of the running station."""
    f0, t0 = st.core.counters.frames, time.monotonic()
    lat: list[float] = []
    while time.monotonic() - t0 < seconds:
        time.sleep(0.5)
        lat.append(st.stats.latency_ms_p50)
    return {"fps": (st.core.counters.frames - f0) / (time.monotonic() - t0), "latency_ms": statistics.median(lat)}


def run(cfg: Any, seconds: float, settle: float, warmup: float, rounds: int) -> dict[str, list[dict[str, float]]]:
    """One station; windows alternate HMI closed (no server, no hook) and open (server + streaming client)."""
    from station.hmi import HmiServer
    from station.runtime import Station

    out: dict[str, list[dict[str, float]]] = {"closed": [], "open": []}
    with tempfile.TemporaryDirectory() as tmp:
        st = Station(cfg, records_path=str(Path(tmp) / "r.sqlite"))
        st.start()
        try:
            time.sleep(warmup)
            for r in range(rounds):
                for mode in ("closed", "open"):
                    srv = proc = None
                    try:
                        if mode == "open":
                            srv = HmiServer(st, cfg.hmi, audit_path=Path(tmp) / "audit.jsonl")
                            url = srv.start()
                            proc = subprocess.Popen([sys.executable, __file__, "--client", url])
                        time.sleep(settle)          # the client's start-up is not the HMI's steady cost
                        enc0 = srv.hmi.preview.encoded if srv else 0
                        t0 = time.monotonic()
                        res = window(st, seconds)
                        res["preview_fps"] = ((srv.hmi.preview.encoded - enc0) / (time.monotonic() - t0)
                                              if srv else 0.0)
                    finally:
                        if proc is not None:
                            proc.terminate()
                            proc.wait(timeout=10)
                        if srv is not None:
                            srv.stop()
                    out[mode].append(res)
                    print(f"round {r + 1} {mode:6s}  fps {res['fps']:6.2f}  latency p50 {res['latency_ms']:7.1f} ms  "
                          f"preview {res['preview_fps']:4.1f} fps", flush=True)
            if st.state.state.value != "running":
                raise RuntimeError(f"the line left 'running' ({st.state.state.value}: {st.state.reason}): "
                                   "the figures are void")
        finally:
            st.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per window")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds after switching before measuring")
    ap.add_argument("--warmup", type=float, default=6.0, help="seconds before the first window (model warm, belt full)")
    ap.add_argument("--rounds", type=int, default=6, help="closed/open window pairs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="configuration override")
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        client(a.client)
        return 0

    import logging

    from station.cli import _override
    from station.config import StationConfig

    logging.basicConfig(level=logging.ERROR)
    cfg = StationConfig()
    for item in [*a.set, f"sim.seed={a.seed}", "hmi.port=0"]:
        cfg = _override(cfg, item)
    runs = run(cfg, a.seconds, a.settle, a.warmup, a.rounds)
    agg = {m: {k: statistics.mean(x[k] for x in v) for k in ("fps", "latency_ms", "preview_fps")}
           for m, v in runs.items()}
    c, o = agg["closed"], agg["open"]
    fps_ratio = o["fps"] / c["fps"]
    lat_ratio = o["latency_ms"] / c["latency_ms"]
    print(f"HMI closed: {c['fps']:.2f} fps, latency p50 {c['latency_ms']:.1f} ms")
    print(f"HMI open:   {o['fps']:.2f} fps, latency p50 {o['latency_ms']:.1f} ms "
          f"(live view {o['preview_fps']:.1f} fps at {cfg.hmi.preview_width} px)")
    paired = [o_["fps"] / c_["fps"] for c_, o_ in zip(runs["closed"], runs["open"])]
    print(f"per-round fps ratio open/closed: {' '.join(f'{x:.3f}' for x in paired)} "
          f"(median {statistics.median(paired):.3f})")
    print(f"ratio open/closed: fps {fps_ratio:.3f} (cost {100 * (1 - fps_ratio):+.1f} %), "
          f"latency {lat_ratio:.3f} (cost {100 * (lat_ratio - 1):+.1f} %); target: cost <= 5 %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
