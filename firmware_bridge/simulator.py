"""Firmware simulator: a Python model of the diverter MCU, on the far end of a real pseudo-terminal.

It implements the MCU side of PROTOCOL.md rule for rule, so the host link is exercised exactly as on
hardware. The physical world (clock, encoder, outputs) comes from an :class:`McuEnvironment`.

All protocol state is owned by the simulator thread; the public control methods (``reset``,
``set_estop``, ``drop_rx``) post requests that the thread applies at the start of its next pass, so there
are no data races and the order of events is the order of passes.

Run ``python -m firmware_bridge.simulator`` to serve a constant-speed belt on a pty for manual poking.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import random
import select
import signal
import threading
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from .environment import ConstantSpeedEnvironment, McuEnvironment
from .framing import Frame, FrameDecoder
from .messages import (
    HOST_TO_MCU,
    PROTOCOL_VERSION,
    Ack,
    Arm,
    BeltRun,
    Cancel,
    Configure,
    DiverterSetup,
    EncoderReport,
    Ended,
    EventAck,
    Fault,
    FaultCode,
    FireAt,
    FireNow,
    Fired,
    GateSetup,
    Heartbeat,
    Hello,
    Identify,
    InputEdge,
    Message,
    Nak,
    NakReason,
    ProtocolError,
    ProtocolVersionMismatch,
    Status,
    UnknownMessageType,
    decode_message,
    encode_message,
)
from .pseudo_terminal import close_pty_pair, open_pty_pair

log = logging.getLogger(__name__)

QUEUE_LIMIT = 64
OUTCOME_MEMORY = 1024
RATE_WINDOW_US = 100_000
HEARTBEAT_PERIOD_US = 100_000
STATUS_PERIOD_US = 500_000
EVENT_SLOTS = 128  # queue (64) + room for FireNow reports and faults while the host is away
EVENT_RESEND_US = 50_000  # first re-send of an unacked event; doubles per re-send ...
EVENT_RESEND_MAX_US = 400_000  # ... up to this
DEFAULT_REPORT_INTERVAL_MS = 20
TX_BUFFER_LIMIT = 64 * 1024
POLL_TIMEOUT_S = 0.001
FW_VERSION = 0x0300


@dataclass(frozen=True)
class WatchdogTrip:
    """One watchdog trip, on the clock the watchdog is measured on (seconds), for tests and benches.

    ``previous_check_s`` is the check just before the trip: tripping in the first check past the deadline
    means ``previous_check_s - last_host_rx_s <= watchdog_ms`` < ``trip_s - last_host_rx_s``.
    """

    last_host_rx_s: float
    previous_check_s: float
    trip_s: float
    frames_rx: int  # host frames received so far (stats["frames_rx"]) when it tripped


@dataclass
class _Event:
    msg: Message
    next_tx_us: int
    interval_us: int


@dataclass
class _Queued:
    command_id: int
    diverter: int
    belt_count: int
    on_count: int
    pulse_ms: int


class FirmwareSimulator:
    """Serves the MCU side of the protocol on ``fd`` (a pty master) against ``env``.

    ``watchdog_clock`` (seconds) overrides the clock the watchdog is measured on. Default: the MCU clock
    (``env.mcu_time_us``), as on hardware. A virtual-time run whose virtual clock outpaces wall time while
    the host heartbeats on wall time should pass ``time.monotonic`` here, or the watchdog trips spuriously.

    ``clock_drift_ppm`` and ``clock_offset_us`` make the MCU's clock run fast/slow and start elsewhere
    (``offset + (1 + drift) * env.mcu_time_us()``), as a real crystal does: the host's clock estimate
    (``firmware_bridge.clock_sync``) is tested against them. The encoder is not affected.

    The belt-run output (BeltRun) goes to ``env.set_belt_running(bool)`` when the environment has one.
    """

    def __init__(
        self,
        env: McuEnvironment,
        fd: int,
        *,
        fw_version: int = FW_VERSION,
        watchdog_clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        clock_drift_ppm: float = 0.0,
        clock_offset_us: int = 0,
    ) -> None:
        self.env = env
        self.fd = fd
        self.fw_version = fw_version
        self._drift = 1.0 + clock_drift_ppm * 1e-6
        self._offset_us = int(clock_offset_us)
        self._wd_clock = watchdog_clock or (lambda: self._mcu_now() / 1e6)
        self._rng = rng or random.Random()
        self.slave_path: str | None = None
        self._owns_pty = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._requests: deque[Callable[[], None]] = deque()
        self._pass_cv = threading.Condition()
        self._passes = 0
        self._drop: dict[int, int] = {}
        self.belt_running = False
        self.last_watchdog_trip: WatchdogTrip | None = None
        self.stats: dict[str, int] = {
            "frames_rx": 0, "fired": 0, "naks": 0, "bad_frames": 0, "tx_dropped_bytes": 0,
            "rx_dropped_on_purpose": 0, "watchdog_trips": 0, "boots": 0, "faults": 0, "events": 0,
            "event_resends": 0, "events_dropped": 0,
        }
        self._power_on()

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def on_new_pty(cls, env: McuEnvironment, **kwargs: object) -> FirmwareSimulator:
        """A simulator on a fresh pty it owns (closed by :meth:`stop`); connect the host to ``slave_path``."""
        master_fd, slave_path = open_pty_pair()
        sim = cls(env, master_fd, **kwargs)  # type: ignore[arg-type]
        sim.slave_path = slave_path
        sim._owns_pty = True
        return sim

    # ----------------------------------------------------------------- public control
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("FirmwareSimulator already started; create a new one to restart")
        self._send(self._hello())
        self._thread = threading.Thread(target=self._run, name="firmware-sim", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("firmware simulator thread did not stop within %.1f s", timeout)
        if self._owns_pty:
            close_pty_pair(self.fd)
            self._owns_pty = False

    def __enter__(self) -> FirmwareSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Simulate a power cycle: queue and configuration lost, new boot_id, a Hello is sent."""
        self._requests.append(self._reboot)

    def set_estop(self, active: bool) -> None:
        """Press (True) or release (False) the emergency stop input."""
        self._requests.append(lambda: self._apply_estop(active))

    def replug(self, timeout: float = 2.0) -> str:
        """Fault injection: the cable is pulled and plugged back (a USB re-enumeration). The MCU keeps
        running (no reset), but its port moves to a new pty: the old one is closed, so the host's reads
        fail. Returns the new slave path. Only for a simulator that owns its pty (:meth:`on_new_pty`)."""
        if not self._owns_pty:
            raise RuntimeError("replug() needs a simulator made with on_new_pty()")
        done = threading.Event()
        result: list[str] = []

        def apply() -> None:
            old = self.fd
            self.fd, path = open_pty_pair()
            close_pty_pair(old)
            self.slave_path = path
            self._decoder.reset()
            self._tx.clear()  # bytes for the old cable are gone with it
            result.append(path)
            done.set()

        self._requests.append(apply)
        if not done.wait(timeout):
            raise RuntimeError("simulator did not apply replug() in time (is it started?)")
        return result[0]

    def drop_rx(self, msg_type: int, count: int = 1) -> None:
        """Fault injection: silently drop the next ``count`` valid frames of ``msg_type`` from the host."""
        def apply() -> None:
            self._drop[int(msg_type)] = self._drop.get(int(msg_type), 0) + count
        self._requests.append(apply)

    def sync(self, timeout: float = 1.0) -> bool:
        """Block until one whole service pass has run after this call (requests applied, encoder sampled,
        due commands fired). Lets a virtual-time driver advance the world in lockstep with the MCU."""
        with self._pass_cv:
            target = self._passes + 2
            return self._pass_cv.wait_for(lambda: self._passes >= target or self._stop.is_set(), timeout)

    @property
    def boot_id(self) -> int:
        return self._boot_id

    @property
    def configured(self) -> bool:
        return self._config is not None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def config(self) -> Configure | None:
        return self._config

    @property
    def armed(self) -> bool:
        return self._armed

    def _mcu_now(self) -> int:
        """The MCU's own clock: the world's time through this crystal's offset and drift."""
        t = self.env.mcu_time_us()
        if self._drift == 1.0 and self._offset_us == 0:
            return t
        return self._offset_us + int(t * self._drift)

    # ----------------------------------------------------------------- state
    def _power_on(self) -> None:
        self._boot_id = self._rng.randrange(1, 2**32)
        self._config: Configure | None = None
        self._config_crc = 0
        self._diverters: dict[int, DiverterSetup] = {}
        self._queue: dict[int, _Queued] = {}
        self._outcomes: OrderedDict[int, Message] = OrderedDict()
        self._estop = getattr(self, "_estop", False)  # the e-stop input survives a reboot
        # Armed unless the e-stop input is active at power-on (PROTOCOL.md §6): a fresh boot has no queue and
        # no configuration, so nothing can fire before the host configures it and sends new commands.
        self._armed = not self._estop
        self._set_belt(False)  # outputs come up off
        self._tripped = False
        self._last_host_rx = self._wd_clock()
        self._last_wd_check = self._last_host_rx
        self._decoder = FrameDecoder()
        self._tx = bytearray()
        self._tx_seq = 0
        self._samples: deque[tuple[int, int]] = deque()
        now = self._mcu_now()
        self._next_report = now
        self._next_heartbeat = now
        self._next_status = now
        self._last_status: Status | None = None
        self._events: OrderedDict[int, _Event] = OrderedDict()  # unacked events, oldest first
        self._event_seq = 0
        self._events_dropped = 0
        self._gate_mask = 0  # inputs reported as InputEdge events (GateSetup, PROTOCOL.md §6b); none at boot
        self.stats["boots"] += 1

    def _reboot(self) -> None:
        log.info("simulated MCU reset (old boot_id %08x)", self._boot_id)
        self._power_on()
        self._send(self._hello())

    def _hello(self) -> Hello:
        return Hello(self._boot_id, self.fw_version, PROTOCOL_VERSION, self._config_crc)

    def _status(self) -> Status:
        return Status(len(self._queue), self._estop, self._config is not None, self._tripped,
                      min(len(self._events), 255), min(self._events_dropped, 0xFFFF), self._armed,
                      self.belt_running)

    @property
    def events_pending(self) -> int:
        return len(self._events)

    # ----------------------------------------------------------------- main loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._service_pass()
        except Exception:
            log.exception("firmware simulator crashed; the host will see silence and time out")
            raise
        finally:
            with self._pass_cv:
                self._pass_cv.notify_all()

    def _service_pass(self) -> None:
        while self._requests:
            self._requests.popleft()()
        for frame in self._decoder.feed(self._read()):
            self._on_frame(frame)
        now_us = self._mcu_now()
        count = self.env.encoder_count()
        self._input_edges()
        self._sample(now_us, count)
        self._fire_due(count)
        self._check_watchdog()
        self._periodic(now_us, count)
        self._flush()
        with self._pass_cv:
            self._passes += 1
            self._pass_cv.notify_all()

    def _read(self) -> bytes:
        try:
            ready, _, _ = select.select([self.fd], [], [], POLL_TIMEOUT_S)
        except (OSError, ValueError):
            time.sleep(POLL_TIMEOUT_S)  # fd closed under us: stop() follows
            return b""
        if not ready:
            return b""
        try:
            return os.read(self.fd, 4096)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:  # no slave opener: nobody connected
                time.sleep(POLL_TIMEOUT_S)
                return b""
            raise

    def _send(self, msg: Message) -> None:
        self._tx += encode_message(msg, self._tx_seq)
        self._tx_seq = (self._tx_seq + 1) & 0xFF
        if len(self._tx) > TX_BUFFER_LIMIT:
            # Nobody is reading: behave like a UART with no listener and drop the backlog.
            self.stats["tx_dropped_bytes"] += len(self._tx)
            self._tx.clear()
        self._flush()

    def _flush(self) -> None:
        while self._tx:
            try:
                n = os.write(self.fd, self._tx)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EBADF):
                    self.stats["tx_dropped_bytes"] += len(self._tx)
                    self._tx.clear()
                    return
                raise
            del self._tx[:n]

    # ----------------------------------------------------------------- receive
    def _on_frame(self, frame: Frame) -> None:
        try:
            msg = decode_message(frame)
        except ProtocolVersionMismatch:
            self.stats["bad_frames"] += 1
            log.warning("host frame with protocol version %d (we speak %d)", frame.version, PROTOCOL_VERSION)
            self._fault(FaultCode.BAD_VERSION, frame.version)
            return
        except UnknownMessageType as exc:
            self.stats["bad_frames"] += 1
            log.warning("%s", exc)
            self._nak(frame, 0, NakReason.UNSUPPORTED)
            return
        except ProtocolError as exc:
            self.stats["bad_frames"] += 1
            log.warning("bad host frame: %s", exc)
            self._nak(frame, 0, NakReason.BAD_PARAMS)
            return
        if self._drop.get(frame.msg_type, 0) > 0:
            self._drop[frame.msg_type] -= 1
            self.stats["rx_dropped_on_purpose"] += 1
            return
        self.stats["frames_rx"] += 1
        self._last_host_rx = self._wd_clock()
        if frame.msg_type not in HOST_TO_MCU:
            self._nak(frame, 0, NakReason.UNSUPPORTED)
            return
        if isinstance(msg, Heartbeat):
            if self._tripped:
                self._tripped = False
                log.info("watchdog re-armed by host heartbeat")
                self._send_status()
        elif isinstance(msg, Identify):
            self._send(self._hello())
        elif isinstance(msg, Configure):
            self._on_configure(frame, msg)
        elif isinstance(msg, FireAt):
            self._on_fire_at(frame, msg)
        elif isinstance(msg, FireNow):
            self._on_fire_now(frame, msg)
        elif isinstance(msg, Cancel):
            self._on_cancel(frame, msg)
        elif isinstance(msg, BeltRun):
            self._on_belt_run(frame, msg)
        elif isinstance(msg, Arm):
            self._on_arm(frame, msg)
        elif isinstance(msg, GateSetup):
            self._gate_mask = msg.mask  # any 32-bit mask: inputs the board has not wired never change
            self._send(Ack(frame.seq, frame.msg_type, 0))
        elif isinstance(msg, EventAck):
            if msg.boot_id == self._boot_id:
                self._events.pop(msg.event_seq, None)

    def _nak(self, frame: Frame, command_id: int, reason: NakReason) -> Nak:
        nak = Nak(frame.seq, frame.msg_type, command_id, reason)
        self.stats["naks"] += 1
        self._send(nak)
        return nak

    def _on_configure(self, frame: Frame, msg: Configure) -> None:
        ids = [d.id for d in msg.diverters]
        valid = (
            math.isfinite(msg.mm_per_count) and msg.mm_per_count > 0
            and msg.watchdog_ms >= 20 and msg.report_interval_ms >= 1
            and len(set(ids)) == len(ids) and all(d.max_on_ms >= 1 for d in msg.diverters)
        )
        if not valid:
            log.warning("Configure rejected: %s", msg)
            self._nak(frame, 0, NakReason.BAD_PARAMS)
            return
        crc = zlib.crc32(msg.encode_payload())
        if crc != self._config_crc:
            self._cancel_all(NakReason.NOT_CONFIGURED)
        self._config = msg
        self._config_crc = crc
        self._diverters = {d.id: d for d in msg.diverters}
        self._tripped = False
        self._send(Ack(frame.seq, frame.msg_type, 0))
        self._send_status()

    def _check_fire(self, diverter: int, pulse_ms: int) -> NakReason | None:
        if self._estop:
            return NakReason.ESTOP
        if self._config is None:
            return NakReason.NOT_CONFIGURED
        if not self._armed:
            return NakReason.NOT_ARMED
        if self._tripped:
            return NakReason.WATCHDOG
        setup = self._diverters.get(diverter)
        if setup is None:
            return NakReason.UNKNOWN_DIVERTER
        if pulse_ms < 1 or pulse_ms > setup.max_on_ms:
            return NakReason.BAD_PARAMS
        return None

    def _repeat_outcome(self, frame: Frame, command_id: int) -> bool:
        """A retransmitted command gets the same answer as the first copy, and is never queued twice."""
        first = self._outcomes.get(command_id)
        if first is None:
            return False
        if isinstance(first, Nak):
            self._nak(frame, command_id, first.reason)
        else:
            self._send(Ack(frame.seq, frame.msg_type, command_id))
        return True

    def _remember(self, command_id: int, outcome: Message) -> None:
        self._outcomes[command_id] = outcome
        while len(self._outcomes) > OUTCOME_MEMORY:
            self._outcomes.popitem(last=False)

    def _on_fire_at(self, frame: Frame, msg: FireAt) -> None:
        if self._repeat_outcome(frame, msg.command_id):
            return
        reason = self._check_fire(msg.diverter, msg.pulse_ms)
        on_count = msg.belt_count
        if reason is None and len(self._queue) >= QUEUE_LIMIT:
            reason = NakReason.QUEUE_FULL
        if reason is None:
            on_count = msg.belt_count - self._compensation_counts(self._diverters[msg.diverter].latency_us)
            if self.env.encoder_count() >= on_count:
                reason = NakReason.LATE
        if reason is not None:
            log.info("command %d: NAK %s", msg.command_id, reason.name)
            self._remember(msg.command_id, self._nak(frame, msg.command_id, reason))
            return
        self._queue[msg.command_id] = _Queued(msg.command_id, msg.diverter, msg.belt_count, on_count, msg.pulse_ms)
        ack = Ack(frame.seq, frame.msg_type, msg.command_id)
        self._remember(msg.command_id, ack)
        self._send(ack)
        self._send_status()

    def _on_fire_now(self, frame: Frame, msg: FireNow) -> None:
        if self._repeat_outcome(frame, msg.command_id):
            return
        reason = self._check_fire(msg.diverter, msg.pulse_ms)
        if reason is not None:
            self._remember(msg.command_id, self._nak(frame, msg.command_id, reason))
            return
        ack = Ack(frame.seq, frame.msg_type, msg.command_id)
        self._remember(msg.command_id, ack)
        self._send(ack)
        self._fire(_Queued(msg.command_id, msg.diverter, 0, self.env.encoder_count(), msg.pulse_ms))

    def _on_cancel(self, frame: Frame, msg: Cancel) -> None:
        if self._queue.pop(msg.command_id, None) is None:
            self._nak(frame, msg.command_id, NakReason.NOT_QUEUED)
            return
        log.info("command %d: cancelled by host", msg.command_id)
        self._send(Ack(frame.seq, frame.msg_type, msg.command_id))
        self._event(lambda seq: Ended(self._boot_id, seq, msg.command_id, NakReason.CANCELLED))
        self._send_status()

    def _on_belt_run(self, frame: Frame, msg: BeltRun) -> None:
        """PROTOCOL.md §5a: stopping is always allowed (the safe direction); running needs the same state
        as firing. Queued commands stay queued across a stop: they are scheduled by belt position."""
        if msg.run not in (0, 1):
            self._nak(frame, 0, NakReason.BAD_PARAMS)
            return
        if msg.run:
            reason = (NakReason.ESTOP if self._estop else NakReason.NOT_CONFIGURED if self._config is None
                      else NakReason.NOT_ARMED if not self._armed else NakReason.WATCHDOG if self._tripped else None)
            if reason is not None:
                self._nak(frame, 0, reason)
                return
        changed = self._set_belt(bool(msg.run))
        self._send(Ack(frame.seq, frame.msg_type, 0))
        if changed:
            self._send_status()

    def _on_arm(self, frame: Frame, msg: Arm) -> None:
        """PROTOCOL.md §6: Arm(1) is the explicit re-arm after an e-stop; Arm(0) disarms (software e-stop)."""
        if msg.arm not in (0, 1):
            self._nak(frame, 0, NakReason.BAD_PARAMS)
            return
        if msg.arm and self._estop:
            self._nak(frame, 0, NakReason.ESTOP)  # the input is still pressed: nothing to re-arm yet
            return
        changed = self._armed != bool(msg.arm)
        self._armed = bool(msg.arm)
        if not msg.arm:
            self._set_belt(False)
            n = self._cancel_all(NakReason.NOT_ARMED)
            if n:
                log.warning("disarmed by the host; cancelled %d queued commands", n)
        self._send(Ack(frame.seq, frame.msg_type, 0))
        if changed:
            log.info("%s by the host", "re-armed" if msg.arm else "disarmed")
            self._send_status()

    def _set_belt(self, run: bool) -> bool:
        """Drive the belt-run output; True if it changed."""
        if run == getattr(self, "belt_running", False):
            return False
        self.belt_running = run
        hook = getattr(self.env, "set_belt_running", None)
        if hook is not None:
            hook(run)
        log.info("belt %s", "running" if run else "stopped")
        return True

    # ----------------------------------------------------------------- time-driven work
    def counts_per_s(self) -> float:
        """Belt speed as measured from encoder samples over the last RATE_WINDOW_US of MCU time."""
        if len(self._samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        return (c1 - c0) * 1e6 / (t1 - t0) if t1 > t0 else 0.0

    def _compensation_counts(self, latency_us: int) -> int:
        """round(latency_us * counts_per_s / 1e6), computed exactly (ties to even).

        Why not the float product: the C firmware computes this in integers, and a float product that lands
        a hair off an exact .5 would make the two implementations disagree by one count.
        """
        if len(self._samples) < 2:
            return 0
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0
        return round(Fraction(latency_us * (c1 - c0), t1 - t0))

    def _sample(self, now_us: int, count: int) -> None:
        s = self._samples
        if s and s[-1][0] == now_us:
            s[-1] = (now_us, count)
        else:
            s.append((now_us, count))
        # Keep one anchor sample at or before the window start, so a slow poller still has a rate.
        while len(s) >= 2 and s[1][0] <= now_us - RATE_WINDOW_US:
            s.popleft()

    def _fire_due(self, count: int) -> None:
        due = [q for q in self._queue.values() if q.on_count <= count]
        if not due:
            return
        for q in sorted(due, key=lambda q: (q.on_count, q.command_id)):
            del self._queue[q.command_id]
            self._fire(q)
        self._send_status()

    def _fire(self, q: _Queued) -> None:
        self.env.actuate(q.diverter, q.on_count, float(q.pulse_ms), q.command_id)
        self.stats["fired"] += 1
        log.debug("command %d: fired diverter %d at count %d", q.command_id, q.diverter, q.on_count)
        now_us = self._mcu_now()
        self._event(lambda seq: Fired(self._boot_id, seq, q.command_id, q.diverter, q.on_count, now_us))

    def _cancel_all(self, reason: NakReason) -> int:
        n = len(self._queue)
        for q in list(self._queue.values()):
            self._event(lambda seq, cid=q.command_id: Ended(self._boot_id, seq, cid, reason))
        self._queue.clear()
        return n

    # ----------------------------------------------------------------- events (PROTOCOL.md §6a)
    def _event(self, make: Callable[[int], Message]) -> None:
        """Number an event, keep it until the host acks it, and send it now."""
        self._event_seq = (self._event_seq + 1) & 0xFFFFFFFF
        msg = make(self._event_seq)
        if len(self._events) >= EVENT_SLOTS:
            self._events.popitem(last=False)  # the oldest is lost; Status counts it
            self._events_dropped += 1
            self.stats["events_dropped"] += 1
        now_us = self._mcu_now()
        self._events[self._event_seq] = _Event(msg, now_us + EVENT_RESEND_US, EVENT_RESEND_US)
        self.stats["events"] += 1
        self._send(msg)

    def _input_edges(self) -> None:
        """Digital input edges since the last pass (PROTOCOL.md §6b), from ``env.input_edges()`` when the
        environment has one: ``(input, rising, count, env_time_us)`` each, stamped by the world at the edge as
        a pin interrupt would. Edges of inputs not in the GateSetup mask are dropped."""
        poll = getattr(self.env, "input_edges", None)
        if poll is None:
            return
        for inp, rising, count, t_us in poll():
            if not (0 <= inp < 32 and self._gate_mask >> inp & 1):
                continue
            mcu_us = t_us if (self._drift == 1.0 and self._offset_us == 0) else self._offset_us + int(t_us * self._drift)
            self._event(lambda seq, i=inp, r=rising, c=count, t=mcu_us: InputEdge(self._boot_id, seq, i, int(bool(r)), c, t))

    def _fault(self, code: FaultCode, detail: int) -> None:
        self.stats["faults"] += 1
        self._event(lambda seq: Fault(self._boot_id, seq, code, detail))

    def _resend_events(self, now_us: int) -> None:
        for ev in self._events.values():
            if now_us >= ev.next_tx_us:
                ev.interval_us = min(ev.interval_us * 2, EVENT_RESEND_MAX_US)
                ev.next_tx_us = now_us + ev.interval_us
                self.stats["event_resends"] += 1
                self._send(ev.msg)

    def _check_watchdog(self) -> None:
        now = self._wd_clock()
        previous, self._last_wd_check = self._last_wd_check, now
        if self._config is None or self._tripped:
            return
        silent_s = now - self._last_host_rx
        if silent_s * 1000.0 <= self._config.watchdog_ms:
            return
        self._tripped = True
        self.stats["watchdog_trips"] += 1
        self.last_watchdog_trip = WatchdogTrip(self._last_host_rx, previous, now, self.stats["frames_rx"])
        n = self._cancel_all(NakReason.WATCHDOG)
        log.warning("watchdog: no host frame for %.0f ms; cancelled %d queued commands", silent_s * 1000, n)
        self._fault(FaultCode.WATCHDOG, n)
        self._send_status()

    def _apply_estop(self, active: bool) -> None:
        if active == self._estop:
            return
        self._estop = active
        if active:
            self._armed = False  # only the host's Arm(1), after release, re-arms (PROTOCOL.md §6)
            self._set_belt(False)
            n = self._cancel_all(NakReason.ESTOP)
            log.warning("e-stop pressed; cancelled %d queued commands", n)
            self._fault(FaultCode.ESTOP, n)
        self._send_status()

    def _send_status(self) -> None:
        status = self._status()
        self._last_status = status
        self._send(status)

    def _periodic(self, now_us: int, count: int) -> None:
        interval_ms = self._config.report_interval_ms if self._config else DEFAULT_REPORT_INTERVAL_MS
        if now_us >= self._next_report:
            self._send(EncoderReport(count, now_us))
            # Schedule from now, not from the missed slot: never send a backlog of stale reports.
            self._next_report = now_us + interval_ms * 1000
        if now_us >= self._next_heartbeat:
            self._send(Heartbeat(now_us, self._boot_id))
            self._next_heartbeat = now_us + HEARTBEAT_PERIOD_US
        if now_us >= self._next_status:
            self._send_status()
            self._next_status = now_us + STATUS_PERIOD_US
        self._resend_events(now_us)


def main(argv: list[str] | None = None) -> int:
    """Serve a constant-speed belt on a new pty until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m firmware_bridge.simulator",
        description="Kozan diverter MCU simulator on a pseudo-terminal (constant-speed belt, no encoder).",
    )
    parser.add_argument("--mm-per-count", type=float, default=0.1, help="belt travel per encoder count")
    parser.add_argument("--speed", type=float, default=200.0, help="belt speed in mm/s")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every frame decision")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    def stop_on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # `kill` (service managers, scripts) stops as cleanly as Ctrl-C

    signal.signal(signal.SIGTERM, stop_on_term)
    env = ConstantSpeedEnvironment(args.mm_per_count, args.speed)
    sim = FirmwareSimulator.on_new_pty(env)
    sim.start()
    print(sim.slave_path, flush=True)
    log.info("serving on %s (boot_id %08x); Ctrl-C to stop", sim.slave_path, sim.boot_id)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
