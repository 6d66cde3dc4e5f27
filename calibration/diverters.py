"""Diverter position and actuator latency, measured through the serial link's gate inputs.

The same measurement runs on a real station and on the simulated line: only the rig differs.

- *Position*: a puck (a small ChArUco target) rides the belt through the camera view; the frames, stamped
  with the belt count, give its centre's belt-fixed position through the belt calibration. The light gate
  at the diverter, wired to the MCU, reports the beam's blocked/clear edges with the encoder count at each
  edge (``InputEdgeEvent``, PROTOCOL.md §6b); their mid-count is when the puck's centre crossed it.
- *Latency*: the diverter is fired with ``fire_now``; its ``FiredEvent`` carries the MCU time at which the
  output switched, the actuator sensor's rising ``InputEdgeEvent`` the MCU time at which the flap moved.
  Latency = sensor time − fired time, both on the MCU's clock (no host jitter).

Wiring convention (the reference board, ``board_arduino.ino``): diverter d's belt gate is input 2d, its
actuator sensor input 2d + 1; ``--inputs D:GATE:SENSOR`` overrides it per diverter.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from calibration.solve import DiverterRun, target_origin_mm
from calibration.store import CalibrationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wiring:
    gate: int      # MCU input of the light gate across the belt at the diverter
    sensor: int    # MCU input of the sensor on the actuator (flap reached / cylinder extended)


def default_wiring(diverter: int) -> Wiring:
    return Wiring(2 * diverter, 2 * diverter + 1)


def parse_wiring(specs: list[str] | None) -> dict[int, Wiring]:
    out: dict[int, Wiring] = {}
    for s in specs or []:
        parts = s.split(":")
        try:
            d, g, a = (int(p) for p in parts)
        except ValueError:
            raise CalibrationError(f"--inputs {s!r}: expected DIVERTER:GATE_INPUT:SENSOR_INPUT, e.g. 1:2:3") from None
        if not (0 <= g < 32 and 0 <= a < 32) or g == a:
            raise CalibrationError(f"--inputs {s!r}: inputs are 0..31 and the gate and sensor must differ")
        out[d] = Wiring(g, a)
    return out


class Rig(Protocol):
    """What the measurement needs from a station: its link, time passing, and the puck in the camera."""

    link: Any   # firmware_bridge.DiverterLink

    def wait(self, dt: float) -> None:
        """Let `dt` seconds of belt time pass (virtual on the simulated line)."""

    def puck_frames(self, diverter: int, repeat: int) -> Iterator[tuple[np.ndarray, int]]:
        """The puck laid upstream and carried through the view: (image, belt count at capture)."""

    def close(self) -> None: ...


class EventWatch:
    """Collects the link's gate edges and Fired events (other events are logged and dropped)."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self.edges: list[Any] = []
        self.fired: dict[int, Any] = {}

    def drain(self) -> None:
        from firmware_bridge.events import FiredEvent, InputEdgeEvent, ResetEvent

        for ev in self.link.poll_events():
            if isinstance(ev, InputEdgeEvent):
                self.edges.append(ev)
            elif isinstance(ev, FiredEvent):
                self.fired[ev.command_id] = ev
            elif isinstance(ev, ResetEvent):
                raise CalibrationError("the MCU reset during the measurement (power, watchdog): run the tool again")
            else:
                log.debug("diverter calibration: %s", ev)

    def wait_for(self, rig: Rig, pred: Callable[[], Any], timeout_s: float, step_s: float, what: str) -> Any:
        waited = 0.0
        while True:
            self.drain()
            got = pred()
            if got is not None and got is not False:
                return got
            if waited >= timeout_s:
                raise CalibrationError(what)
            rig.wait(step_s)
            waited += step_s

    def edge(self, inp: int, rising: bool, after_count: float | None = None,
             after_us: int | None = None) -> Any:
        for e in self.edges:
            if e.input == inp and e.rising == rising and (after_count is None or e.count > after_count) \
                    and (after_us is None or e.mcu_time_us >= after_us):
                return e
        return None


def measure_diverters(rig: Rig, ids: list[int], repeats: int, wiring: dict[int, Wiring], detector: Any,
                      geom: Any, puck_len_mm: float, pulse_ms: float = 40.0, gate_timeout_s: float = 30.0,
                      step_s: float = 0.05, progress: Callable[[int, int, str], None] | None = None
                      ) -> list[DiverterRun]:
    """Repeat (puck pass + firing) `repeats` times per diverter; raise CalibrationError with what to check.

    `ids` is measured in the given order; pass them most downstream first, so an earlier puck still riding
    the belt has already passed the gate being measured (a puck blocks every gate it passes)."""
    link = rig.link
    inputs = sorted({i for d in ids for i in (wiring[d].gate, wiring[d].sensor)})
    link.gate_setup(inputs)
    watch = EventWatch(link)
    runs: list[DiverterRun] = []
    cmd = int(time.time()) & 0x3FFFFFFF     # unique per MCU boot: a fresh range per run
    for d in ids:
        w = wiring[d]
        for k in range(repeats):
            # -- position: the puck through the view, then through the diverter's gate
            watch.drain()
            watch.edges = [e for e in watch.edges if e.input != w.gate]     # earlier pucks at this gate
            us, first_count = [], None
            for img, c in rig.puck_frames(d, k):
                first_count = c if first_count is None else first_count
                dd = detector.detect(img)
                if dd is not None and len(dd) >= 4:
                    us.append(target_origin_mm(dd, geom)[0] - geom.travel_mm(c))
            if len(us) < 3:
                raise CalibrationError(f"diverter {d}: the camera saw the puck in only {len(us)} frames — is it "
                                       "flat, lit and fully in view, and the belt running?")
            start = -math.inf if first_count is None else first_count
            rise = watch.wait_for(rig, lambda: watch.edge(w.gate, True, start), gate_timeout_s, step_s,
                                  f"diverter {d}: no edge from its light gate (input {w.gate}) within "
                                  f"{gate_timeout_s:g} s of belt time — check the gate's wiring, alignment and "
                                  "power (--inputs if it is on another input)")
            fall = watch.wait_for(rig, lambda: watch.edge(w.gate, False, rise.count - 1), gate_timeout_s, step_s,
                                  f"diverter {d}: its light gate (input {w.gate}) was blocked and never cleared")
            watch.edges = [e for e in watch.edges if e.mcu_time_us > fall.mcu_time_us or e.input != w.gate]
            gate_mid = (rise.count + fall.count) / 2.0
            # -- latency: fire now; the actuator's sensor says when it moved
            rig.wait(0.1)
            watch.drain()
            watch.edges = [e for e in watch.edges if e.input != w.sensor]   # stale sensor edges
            cmd += 1
            link.fire_now(cmd, d, pulse_ms)
            link.wait_settled(timeout=5.0)
            fired = watch.wait_for(rig, lambda: watch.fired.get(cmd), 2.0, 0.005,
                                   f"diverter {d}: the MCU never reported firing (command {cmd}) — is it armed "
                                   "and configured with this diverter?")
            moved = watch.wait_for(rig, lambda: watch.edge(w.sensor, True, after_us=fired.mcu_time_us), 2.0, 0.005,
                                   f"diverter {d}: its actuator sensor (input {w.sensor}) did not report within "
                                   "2 s of firing — check air/power and the sensor's wiring")
            rig.wait(pulse_ms / 1000.0 + 0.3)    # the pulse ends and the flap returns before the next one
            lat_ms = (moved.mcu_time_us - fired.mcu_time_us) / 1000.0
            runs.append(DiverterRun(d, float(np.median(us)) + puck_len_mm / 2, gate_mid, fired.actual_count,
                                    moved.count, 0.0, latency_ms=lat_ms))
            if progress:
                progress(k + 1, repeats, f"diverter {d}: repeat")
    link.gate_setup([])
    return runs


# ---- rigs ------------------------------------------------------------------------------------------------
class GatedBeltWorld:
    """The simulated line's belt (``station.simline.world.BeltWorld``) with the calibration hardware wired to
    the MCU's inputs: a light gate across the belt at each diverter's true position, seeing the puck's
    leading and trailing edges, and a sensor on each actuator that rises when the flap has moved (the true
    latency after the output switched) and falls when the pulse is over. Edges are stamped exactly (count
    and time at the edge), as the board's pin interrupt does; ``input_edges()`` is the simulator's hook."""

    def __init__(self, world: Any, wiring: dict[int, Wiring], rng: np.random.Generator,
                 gate_noise_mm: float = 0.3, sensor_noise_ms: float = 0.2) -> None:
        import threading

        self.w = world
        self.wiring = wiring
        self.rng = rng
        self.gate_noise_mm = gate_noise_mm
        self.sensor_noise_ms = sensor_noise_ms
        self._lock = threading.Lock()
        self._pending: list[tuple[float, int, bool]] = []    # (world time s, input, rising)

    def __getattr__(self, name: str) -> Any:                   # travel_mm, set_belt_running, ...
        if name == "w":
            raise AttributeError(name)
        return getattr(self.w, name)

    def mcu_time_us(self) -> int:
        return self.w.mcu_time_us()

    def encoder_count(self) -> int:
        return self.w.encoder_count()

    def _t_at_travel(self, x: float) -> float:
        return self.w.t0 + x / self.w.speed

    def lay_puck(self, u0: float, length: float) -> None:
        """A puck occupying belt-fixed [u0, u0 + length] (position = u + travel): schedule its gate edges."""
        with self._lock:
            for d, wr in self.wiring.items():
                p = self.w._div_pos.get(d)
                if p is None:
                    continue
                n1, n2 = self.rng.normal(0.0, self.gate_noise_mm, 2)
                self._pending.append((self._t_at_travel(p - u0 - length + n1), wr.gate, True))
                self._pending.append((self._t_at_travel(p - u0 + n2), wr.gate, False))

    def actuate(self, diverter: int, on_count: int, pulse_ms: float, command_id: int) -> None:
        self.w.actuate(diverter, on_count, pulse_ms, command_id)
        wr = self.wiring.get(diverter)
        if wr is None:
            return
        t = self.w.clock.now()          # the output switches now (FireNow) — the MCU stamps Fired with it
        lat = self.w._latency_s.get(diverter, 0.0) + self.rng.normal(0.0, self.sensor_noise_ms) / 1000.0
        with self._lock:
            self._pending.append((t + max(0.0, lat), wr.sensor, True))
            self._pending.append((t + max(0.0, lat) + pulse_ms / 1000.0, wr.sensor, False))

    def input_edges(self) -> list[tuple[int, bool, int, int]]:
        now = self.w.clock.now()
        with self._lock:
            due = sorted(e for e in self._pending if e[0] <= now)
            self._pending = [e for e in self._pending if e[0] > now]
        return [(inp, rising, int(math.floor(self.w.travel_mm(t) / self.w.mpc + 1e-9)),
                 int(round((t - self.w.t0) * 1e6))) for t, inp, rising in due]


class SimGateRig:
    """The simulated line in virtual time: belt world with gates, camera renderer, and the firmware simulator
    on a real pseudo-terminal behind the real ``DiverterLink`` — the same path as a real station."""

    def __init__(self, cfg: Any, puck: Any, wiring: dict[int, Wiring], seed: int = 0) -> None:
        from station.assembly import open_link
        from station.clock import VirtualClock
        from station.simline.calib_scene import CalibScene
        from station.simline.world import BeltWorld

        cfg = cfg.model_copy(deep=True)
        # virtual time: the host may stall for wall-clock seconds while no belt time passes; the MCU watchdog
        # runs on wall time, so here it only catches a dead host
        cfg.link.watchdog_ms = max(cfg.link.watchdog_ms, 5000)
        self.cfg = cfg
        self.puck = puck
        self.clock = VirtualClock(0.0)
        self.rng = np.random.default_rng(seed + 17)
        self.world = GatedBeltWorld(BeltWorld(cfg, self.clock, n_items=0, seed=seed), wiring, self.rng)
        self.scene = CalibScene(cfg, puck, seed=seed)
        self.bundle = open_link(cfg, self.clock, environment=self.world, watchdog_clock=time.monotonic)
        self.link = self.bundle.link
        self._t = 0.0
        self.period = 1.0 / cfg.camera.fps
        self.wait(0.2)

    def close(self) -> None:
        self.bundle.close()

    def wait(self, dt: float, tick: float = 0.02) -> None:
        """Advance virtual time by `dt`, the MCU running a service pass every `tick`: edges and firings are
        stamped exactly whatever the tick (as by the board's interrupts), so coarse ticks lose nothing."""
        end = self._t + dt
        while self._t < end - 1e-12:
            self._t = min(end, self._t + tick)
            self.clock.advance_to(self._t)
            if not self.bundle.firmware.sync(timeout=5.0):
                raise CalibrationError("the firmware simulator stopped answering")

    def puck_frames(self, diverter: int, repeat: int, every: int = 6) -> Iterator[tuple[np.ndarray, int]]:
        w = self.world
        travel0 = w.travel_mm()
        y0 = self.rng.uniform(60.0, self.cfg.line.belt_width_mm - 60.0 - self.puck.size_mm[1])
        u0 = -self.puck.size_mm[0] - 20.0 - travel0 + self.rng.uniform(0.0, 30.0)   # just upstream of the view
        w.lay_puck(u0, self.puck.size_mm[0])
        view_mm = self.cfg.camera.width / self.cfg.camera.px_per_mm
        k = 0
        while u0 + w.travel_mm() < view_mm + 10.0:
            self.wait(self.period, tick=self.period)
            k += 1
            if k % every:
                continue      # a handful of sharp views, not every frame
            travel = w.travel_mm()
            yield self.scene.render_on_belt(u0 + travel, y0), int(math.floor(travel / w.mpc + 1e-9))


class LiveGateRig:
    """A real station: the MCU on its serial port (gates wired to its inputs), the live camera; frames are
    stamped with the belt count through the link's MCU clock estimate (``belt_count_at``)."""

    def __init__(self, cfg: Any, say: Callable[[str], None], view_timeout_s: float = 60.0) -> None:
        from station.assembly import open_link
        from station.clock import MonotonicClock
        from vision.sources import open_camera

        self.cfg = cfg
        self.say = say
        self.view_timeout_s = view_timeout_s
        self.bundle = open_link(cfg, MonotonicClock())
        self.link = self.bundle.link
        try:
            self.cam = open_camera(cfg.camera.source, cfg.camera.width, cfg.camera.height, cfg.camera.fps)
        except Exception:
            self.bundle.close()
            raise
        self.link.belt_run(True)

    def close(self) -> None:
        try:
            self.link.belt_run(False)
        finally:
            self.cam.close()
            self.bundle.close()

    def wait(self, dt: float) -> None:
        time.sleep(dt)

    def puck_frames(self, diverter: int, repeat: int, lost_after: int = 5) -> Iterator[tuple[np.ndarray, int]]:
        """Frames from when the technician lays the puck until it has left the view (not seen `lost_after`
        frames in a row after being seen); the caller's detector decides what it sees."""
        from calibration.targets import TargetDetector, TargetSpec

        det = TargetDetector(TargetSpec(4, 3, 25.0, 18.0, "5x5_100"))
        self.say(f"  diverter {diverter}, pass {repeat + 1}: lay the puck flat on the running belt, upstream of the "
                 "camera, in line with the diverter's gate")
        seen, missing, t_end = False, 0, time.monotonic() + self.view_timeout_s
        while time.monotonic() < t_end:
            f = self.cam.read()
            try:
                c = self.link.belt_count_at(f.t_ns / 1e9)
            except Exception:                 # the MCU clock estimate is not ready yet
                continue
            d = det.detect(f.image)
            if d is not None and len(d) >= 4:
                seen, missing = True, 0
                yield f.image, int(round(c))
            elif seen:
                missing += 1
                if missing >= lost_after:
                    return
        if not seen:
            raise CalibrationError(f"diverter {diverter}: no puck in view within {self.view_timeout_s:g} s")
