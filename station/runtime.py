"""The station in real time: capture thread, processing loop, serial I/O thread (in the link).

Capture keeps only the newest frame: latency beats completeness, and every frame replaced before
the loop took it is counted as dropped. The loop runs detection, tracking and sorting on the
newest frame; the diverter link does its serial I/O in its own thread. onnxruntime and OpenCV
release the GIL, so the capture thread renders/grabs while inference runs.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from station.alarms import AlarmBoard, Severity
from station.assembly import build_detector, build_looks, detector_settings, geometry_from_config, open_link
from station.clock import MonotonicClock
from station.config import StationConfig
from station.core import FrameResult, StationCore, command_id_base
from station.records import Records
from station.state import IllegalTransition, LineState, StateMachine
from vision.frame import Frame
from vision.sources import CameraLost, open_camera
from vision.taxonomy import load_taxonomy

log = logging.getLogger(__name__)


class LatestFrame:
    """A one-slot mailbox: put never blocks, a replaced frame is counted as dropped."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._frame: Frame | None = None
        self.dropped = 0
        self.captured = 0
        self.error: BaseException | None = None

    def put(self, f: Frame) -> None:
        with self._cv:
            if self._frame is not None:
                self.dropped += 1
            self._frame = f
            self.captured += 1
            self._cv.notify()

    def fail(self, e: BaseException) -> None:
        with self._cv:
            self.error = e
            self._cv.notify()

    def take(self, timeout: float) -> Frame | None:
        with self._cv:
            if self._frame is None and self.error is None:
                self._cv.wait(timeout)
            f, self._frame = self._frame, None
            return f


@dataclass
class LiveStats:
    fps: float = 0.0
    latency_ms_p50: float = 0.0       # capture -> decisions made, per frame
    latency_ms_max: float = 0.0
    _lat: list[float] = field(default_factory=list)
    _t: list[float] = field(default_factory=list)

    def add(self, now: float, latency_s: float) -> None:
        self._t.append(now)
        self._lat.append(latency_s)
        cut = now - 2.0
        while self._t and self._t[0] < cut:
            self._t.pop(0)
            self._lat.pop(0)
        if len(self._t) > 1:
            self.fps = (len(self._t) - 1) / max(self._t[-1] - self._t[0], 1e-6)
        s = sorted(self._lat)
        self.latency_ms_p50 = s[len(s) // 2] * 1000
        self.latency_ms_max = s[-1] * 1000


class Station:
    """A running station. `start()` brings it up; `stop()` takes it down cleanly."""

    def __init__(self, cfg: StationConfig, records_path: str | None = None):
        self.cfg = cfg
        self.clock = MonotonicClock()
        self.alarms = AlarmBoard(self.clock.now)
        self.state = StateMachine()
        self.mailbox = LatestFrame()
        self.stats = LiveStats()
        self.world = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._configured_model = cfg.detector.model
        self.detector = build_detector(cfg)
        if cfg.camera.source == "sim":
            from station.simline.camera import SimCamera
            from station.simline.world import BeltWorld

            self.world = BeltWorld(cfg, self.clock)
            self.camera: Any = SimCamera(cfg, self.world, self.clock)
        else:
            self.camera = open_camera(cfg.camera.source, cfg.camera.width, cfg.camera.height, cfg.camera.fps)
        self.records = Records(records_path or cfg.resolve(cfg.records.path), batch_s=cfg.records.batch_s,
                               synchronous=cfg.records.synchronous)
        self.alarms.listeners.append(self.records.alarm_raised)   # every alarm raise goes on record
        # the simulated world above is the truth; everything below runs on the calibrated values
        from calibration.apply import calibrated_config
        cfg = self.cfg = calibrated_config(cfg)
        self.bundle = open_link(cfg, self.clock, environment=self.world)
        self.link = self.bundle.link
        try:
            cps_cfg = cfg.line.belt_speed_mm_s / cfg.line.mm_per_count
            bc = self.link.belt_clock
            self.core = StationCore(cfg, self.detector, self.link, self.records, load_taxonomy(),
                                    geometry_from_config(cfg), self.clock.now,
                                    counts_per_s=lambda: bc.counts_per_s if bc.ready else cps_cfg,
                                    model_version=self.detector.info.version, alarms=self.alarms,
                                    first_command_id=command_id_base(), inspector=build_looks(cfg, threaded=True))
            self.on_frame: Callable[[FrameResult], None] | None = None   # the HMI's hook; must not block
            from station.capture import open_capture

            self.capture = open_capture(cfg, tuple(self.detector.names), self.alarms,
                                        lambda: self.core.model_version)
        except BaseException:
            # no station to stop(): the link (and its simulator's pty) must not outlive this failed start,
            # the link first, so it never sees its pty go away
            self.bundle.close()
            raise
        self.core.capture = self.capture
        self.swap_log: list[dict[str, Any]] = []      # every hot-swap attempt, refused ones included
        self._swap_lock = threading.Lock()
        self._swapping: threading.Thread | None = None

    # ---- threads -------------------------------------------------------------------------------
    def _capture(self) -> None:
        while not self._stop.is_set():
            try:
                self.mailbox.put(self.camera.read())
            except CameraLost as e:
                self.alarms.raise_("camera_lost", Severity.FAULT, f"camera lost: {e}", params={"error": str(e)})
                self.mailbox.fail(e)
                return
            except Exception as e:  # a bug in a source must not leave the loop waiting forever
                log.exception("capture thread failed")
                self.mailbox.fail(e)
                return

    def _frame_count(self, f: Frame) -> int | None:
        if f.belt_count is not None:
            return f.belt_count
        bc = self.link.belt_clock
        return int(bc.count_at(f.t_ns / 1e9)) if bc.ready else None

    def _loop(self) -> None:
        while not self._stop.is_set():
            f = self.mailbox.take(timeout=0.5)
            if self.mailbox.error is not None:
                self.state.fault(f"camera: {self.mailbox.error}")
                return
            self.core.handle_link_events()
            self._follow_mcu_estop()
            if self.world is not None:
                self.world.settle()
            if f is None or self.state.state != LineState.RUNNING:
                continue
            count = self._frame_count(f)
            if count is None:
                self.alarms.raise_("belt_position_unknown", Severity.WARNING,
                                   "no encoder reports yet: frames cannot be placed on the belt")
                continue
            res = self.core.process(f, count)
            now = self.clock.now()
            self.stats.add(now, now - f.t_ns / 1e9)
            if self.on_frame is not None:
                try:
                    self.on_frame(res)
                except Exception:
                    log.exception("frame hook failed (ignored: the line goes on)")

    def _follow_mcu_estop(self) -> None:
        """The diverter MCU's e-stop (its Fault(ESTOP), or a Status saying it is pressed or not re-armed) puts
        the line in e-stop, so that only the operator's reset leaves it; that reset re-arms the MCU."""
        if getattr(self.link, "estop_latched", False) and self.state.state != LineState.ESTOP:
            self.state.estop("e-stop on the diverter controller: release it, then reset the line")

    # ---- hot-swap -------------------------------------------------------------------------------
    def swap_model(self, path: str | Path, version: str | None = None) -> threading.Thread:
        """Load `path` in the background, validate it, and switch to it between two frames.

        The belt keeps running and the tracks in flight keep their votes. A model that does not
        load, has no fixed 3-channel input, names classes the rules do not know or other classes
        than the running model is refused with an alarm; the running model stays. Returns the
        loader thread (join it to wait); the outcome is appended to `swap_log`.
        """
        with self._swap_lock:
            if self._swapping is not None and self._swapping.is_alive():
                raise RuntimeError("a model is being loaded already; wait for it to finish")
            t = threading.Thread(target=self._load_and_offer, args=(Path(path), version), name="model-swap",
                                 daemon=True)
            self._swapping = t
        t.start()
        return t

    def _load_and_offer(self, path: Path, version: str | None) -> None:
        from vision.detector import ModelError
        from vision.registry import load_for_station

        t0 = time.monotonic()
        frames0, dropped0 = self.core.counters.frames, self.mailbox.dropped
        rec: dict[str, Any] = {"path": str(path), "from": self.core.model_version}
        try:
            det = load_for_station(path, tuple(self.detector.names), tuple(load_taxonomy().names),
                                   (self.cfg.camera.height, self.cfg.camera.width), **detector_settings(self.cfg))
            rec["load_s"] = round(time.monotonic() - t0, 3)
            v = version or det.info.version
            n_swaps = len(self.core.swaps)
            self.core.offer_detector(det, v)
            while len(self.core.swaps) == n_swaps and not self._stop.is_set() and time.monotonic() - t0 < 30:
                time.sleep(0.002)
            self.detector = det
            rec.update(ok=True, to=v, total_s=round(time.monotonic() - t0, 3),
                       frames_during=self.core.counters.frames - frames0,
                       dropped_during=self.mailbox.dropped - dropped0,
                       switch=self.core.swaps[-1] if len(self.core.swaps) > n_swaps else None)
            self.alarms.raise_("model_swapped", Severity.INFO, f"now detecting with {v} (was {rec['from']}); "
                               f"loaded in {rec['load_s']:.2f} s without stopping the belt",
                               params={"version": v, "was": rec["from"], "load_s": f"{rec['load_s']:.2f}"})
            log.info("hot-swap to %s: %s", v, rec)
        except (ModelError, ValueError) as e:
            rec.update(ok=False, error=str(e), load_s=round(time.monotonic() - t0, 3))
            self.alarms.raise_("model_refused", Severity.WARNING, f"model not switched, {rec['from']} keeps "
                                                                  f"running: {e}",
                               params={"was": rec["from"], "error": str(e)})
            log.error("hot-swap refused: %s", e)
        except Exception as e:   # a bug here must not touch the running model either
            rec.update(ok=False, error=f"{type(e).__name__}: {e}")
            self.alarms.raise_("model_refused", Severity.WARNING, f"model not switched ({e}); "
                                                                  f"{rec['from']} keeps running",
                               params={"was": rec["from"], "error": str(e)})
            log.exception("hot-swap failed")
        self.swap_log.append(rec)

    def _watch_registry(self) -> None:
        """With `detector.model` naming the registry's active.onnx: a promotion or rollback hot-swaps."""
        from vision.registry import ACTIVE_FILE, LEGACY, Registry, RegistryError

        configured = self.cfg.resolve(self._configured_model)
        if configured.name != LEGACY:
            return
        pointer = configured.parent / ACTIVE_FILE
        seen = pointer.stat().st_mtime_ns if pointer.exists() else None
        while not self._stop.wait(1.0):
            now = pointer.stat().st_mtime_ns if pointer.exists() else None
            if now == seen:
                continue
            seen = now
            try:
                reg = Registry(configured.parent)
                path, version = reg.active_path(), reg.active_version()
            except RegistryError as e:
                self.alarms.raise_("model_refused", Severity.WARNING, f"registry: {e}",
                                   detail="model_refused.registry", params={"error": str(e)})
                continue
            if version != self.core.model_version:
                log.info("registry: active model is now %s: hot-swapping", version)
                try:
                    self.swap_model(path, version).join()
                except RuntimeError as e:
                    log.warning("registry change not applied yet: %s", e)
                    seen = None

    def flag_wrong_bin(self, track_id: int, note: str = "") -> str:
        """Operator: item `track_id` went to the wrong bin. Captures its frame for relabelling."""
        if self.capture is None:
            raise RuntimeError("dataset capture is off (capture.enabled: false): the flag is audited, no frame saved")
        return self.capture.flag_wrong_bin(track_id, note)

    def start(self) -> None:
        self.records.start_run("sim-realtime" if self.world is not None else "line",
                               self.detector.info.version, self.cfg.model_dump(mode="json"))
        self.state.start()
        for name, fn in (("capture", self._capture), ("loop", self._loop), ("registry-watch", self._watch_registry)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        from station.plant.hook import start_plant_services   # MQTT publisher + metrics, when enabled
        self.plant = start_plant_services(self)

    def stop(self) -> None:
        self._stop.set()
        try:
            for t in self._threads:
                t.join(timeout=3)
            self.state.stop()
            if self.capture is not None:
                self.capture.close()
            self.records.end_run(self.core.counters.as_dict())
        finally:
            try:
                if getattr(self, "plant", None) is not None:
                    self.plant.stop()       # after end_run: the run's last items go out in its drain
            finally:
                self.bundle.close()         # whatever failed above: the link (before its simulator's pty) closes
                self.records.close()
                self.camera.close()
                if self.core.inspector is not None:
                    self.core.inspector.close()

    def status_line(self) -> str:
        c = self.core.counters
        bins = " ".join(f"b{b}:{n}" for b, n in sorted(c.per_bin.items()))
        h = self.link.health()
        rtt = h.get("rtt_ms")
        rtt_s = f"{rtt:.1f}ms" if isinstance(rtt, (int, float)) else "-"
        return (f"[{self.state.state.value}] fps {self.stats.fps:4.1f}  latency {self.stats.latency_ms_p50:5.1f}ms  "
                f"items {c.decided:4d} ({bins})  missed {c.missed}  dropped {self.mailbox.dropped}  "
                f"link rtt {rtt_s}  alarms {len(self.alarms.active())}  "
                f"durable #{self.records.durable_item_id}")

    # ---- operator and technician actions (the HMI calls these; a refusal says why) ---------------
    def start_line(self) -> None:
        """Idle or paused -> running. Raises IllegalTransition from fault/e-stop: reset first."""
        self.state.start()

    def pause_line(self) -> None:
        """Running -> paused: frames are no longer sorted until the line is started again."""
        self.state.pause()

    def stop_line(self) -> None:
        """Running or paused -> idle (the threads keep running: the line can be started again)."""
        self.state.stop()

    def estop_line(self, reason: str = "e-stop pressed on the HMI") -> None:
        """Software e-stop: stops sorting at once, and disarms the diverter MCU (its queued commands are
        cancelled, outputs and belt off) so nothing already sent fires; only an explicit reset leaves it."""
        self.state.estop(reason)
        disarm = getattr(self.link, "disarm", None)
        if disarm is not None:
            try:
                disarm(timeout=0.3)
            except Exception as e:  # the link keeps re-sending Arm(0) until the MCU acks it
                log.error("e-stop: the diverter MCU has not acknowledged the disarm yet (%s); still trying", e)

    def reset_line(self) -> None:
        """Fault or e-stop -> idle, after a person has looked at the cause. After an e-stop this is the
        explicit re-arm of the diverter MCU; refused while its e-stop input is still pressed."""
        if self.state.state in (LineState.FAULT, LineState.ESTOP) and getattr(self.link, "estop_latched", False):
            try:
                self.link.rearm()
            except Exception as e:  # LinkError: the input is still pressed, or the link is down
                raise IllegalTransition(f"cannot reset the line: {e}") from None
        self.state.reset()

    def send_next_to_manual(self, n: int = 1) -> int:
        """Operator override: the next `n` items go to the manual path whatever they are."""
        if n < 1:
            raise ValueError(f"n={n}: send at least one item to manual")
        self.core.sorter.manual_next += n
        return self.core.sorter.manual_next

    def apply_settings(self, changes: dict[str, Any]) -> StationConfig:
        """Technician changes to `rules` (merged key by key) and `diverters` (the whole list).

        The result is validated as a whole configuration before anything changes (the battery
        safety rule, one enabled diverter per bin), so a refused change leaves the line as it was;
        an accepted one applies from the next item decided.
        """
        from station.config import ConfigError, config_from_dict

        unknown = set(changes) - {"rules", "diverters"}
        if unknown:
            raise ConfigError(f"only rules and diverters can change on a running station, not {sorted(unknown)}")
        data = self.cfg.model_dump(mode="json")
        if "rules" in changes:
            if not isinstance(changes["rules"], dict):
                raise ConfigError("rules: expected a mapping of rule settings")
            for k, v in changes["rules"].items():
                if isinstance(v, dict) and isinstance(data["rules"].get(k), dict):
                    data["rules"][k] = {**data["rules"][k], **v}
                else:
                    data["rules"][k] = v
        if "diverters" in changes:
            data["diverters"] = changes["diverters"]
        new = config_from_dict(data, "settings from the HMI")
        # validated as a whole just above; assigning section by section would re-validate a
        # half-changed configuration (e.g. a diverter off before its rule moved to manual)
        self.cfg.__dict__.update(diverters=new.diverters, rules=new.rules)
        self.core.use_config(self.cfg)
        log.info("settings changed: %s", sorted(changes))
        return self.cfg

    def switch_model(self, model: str) -> str:
        """Load another ONNX model (path relative to the repo root) while the line is idle.

        Its classes must be the ones the tracker and rules were built for; returns its version.
        """
        if self.state.state != LineState.IDLE:
            raise IllegalTransition("stop the line before changing the model")
        trial = self.cfg.model_copy(deep=True)
        trial.detector.model = model
        det = build_detector(trial)
        if tuple(det.names) != tuple(self.detector.names):
            raise ValueError(f"model {model} detects {list(det.names)}, the station was built for "
                             f"{list(self.detector.names)}: restart `kozan run` with that model instead")
        self.detector = det
        self.core.detector = det
        self.core.model_version = det.info.version
        self.cfg.detector.model = model
        log.info("model switched to %s (%s)", model, det.info.version)
        return det.info.version
