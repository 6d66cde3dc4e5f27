"""Host side of the diverter link (PROTOCOL.md §4–§7), on pyserial.

One I/O thread reads the port, dispatches answers, sends heartbeats and retransmits unanswered
commands. Callers (the station loop) only ever queue frames and drain events, so a slow station loop
never delays a heartbeat and a stalled port never blocks the station loop for longer than a write.

Two clocks, on purpose: transport timers (heartbeat, retransmit, round-trip time) always run on
``time.monotonic`` because they are about the wire; everything about the belt (BeltClock samples, event
stamps) uses the injected ``clock``, so a virtual-time simulation stays deterministic.
"""

from __future__ import annotations

import logging
import math
import select
import statistics
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import serial

from .belt_clock import BeltClock
from .events import (
    AckEvent,
    CommandTimeoutEvent,
    FaultEvent,
    FiredEvent,
    LinkErrorEvent,
    LinkEvent,
    NakEvent,
    ResetEvent,
)
from .framing import Frame, FrameDecoder
from .messages import (
    MAX_DIVERTERS,
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Configure,
    DiverterSetup,
    EncoderReport,
    Ended,
    EventAck,
    Fault,
    FireAt,
    FireNow,
    Fired,
    Heartbeat,
    Hello,
    Identify,
    Message,
    MsgType,
    Nak,
    NakReason,
    ProtocolError,
    ProtocolVersionMismatch,
    Status,
    decode_message,
    encode_message,
)

log = logging.getLogger(__name__)

DEFAULT_BAUDRATE = 250_000
IDENTIFY_PERIOD_S = 0.2
CONFIGURE_RESEND_S = 0.1
POLL_S = 0.001
RESOLVE_INTERVAL_S = 0.2  # re-send period of a command that timed out, until the MCU answers it
DEDUP_MEMORY = 8192  # (boot_id, event_seq) pairs and finished command ids remembered


class LinkError(RuntimeError):
    """The link cannot do what was asked; the message says what to check."""


@dataclass
class _Pending:
    msg: FireAt | FireNow
    first_sent: float
    last_sent: float
    attempts: int = 1
    timed_out: bool = False  # CommandTimeoutEvent emitted; still re-sent until the MCU answers


class _ConfigWaiter:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: Ack | Nak | None = None
        self.first_sent: float | None = None
        self.resent = False


def _pulse(pulse_ms: float) -> int:
    p = int(round(pulse_ms))
    if not 1 <= p <= 0xFFFF:
        raise ValueError(f"pulse_ms={pulse_ms!r} is out of range; allowed 1..65535 ms")
    return p


def validate_configure(msg: Configure) -> None:
    """The MCU's Configure rules (PROTOCOL.md §4), checked on the host so a mistake names the key."""
    if not (math.isfinite(msg.mm_per_count) and msg.mm_per_count > 0):
        raise ValueError(f"mm_per_count={msg.mm_per_count!r}: must be a positive number (belt mm per count)")
    if not 20 <= msg.watchdog_ms <= 0xFFFF:
        raise ValueError(f"watchdog_ms={msg.watchdog_ms!r}: allowed 20..65535")
    if not 1 <= msg.report_interval_ms <= 0xFFFF:
        raise ValueError(f"report_interval_ms={msg.report_interval_ms!r}: allowed 1..65535")
    if len(msg.diverters) > MAX_DIVERTERS:
        raise ValueError(f"{len(msg.diverters)} diverters: one MCU takes at most {MAX_DIVERTERS}")
    seen: set[int] = set()
    for d in msg.diverters:
        if not 0 <= d.id <= 0xFF or d.id in seen:
            raise ValueError(f"diverter id {d.id!r}: ids must be unique and in 0..255")
        seen.add(d.id)
        if not 0 <= d.latency_us <= 0xFFFFFFFF:
            raise ValueError(f"diverter {d.id} latency_us={d.latency_us!r}: allowed 0..4294967295")
        if not 1 <= d.max_on_ms <= 0xFFFF:
            raise ValueError(f"diverter {d.id} max_on_ms={d.max_on_ms!r}: allowed 1..65535")


class DiverterLink:
    """Host end of the diverter protocol over any pyserial URL (``/dev/ttyUSB0``, ``/dev/pts/N``, ``loop://``).

    Typical use::

        link = DiverterLink("/dev/ttyACM0"); link.open()
        link.configure(0.1, [DiverterSetup(0, latency_us=8000, max_on_ms=100)])
        link.fire_at(command_id=1, diverter=0, belt_count=123456, pulse_ms=30)
        for ev in link.poll_events(): ...
    """

    def __init__(
        self,
        url: str,
        *,
        baudrate: int = DEFAULT_BAUDRATE,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_interval_s: float = 0.05,
        retransmit_timeout_s: float = 0.05,
        max_retries: int = 3,
        belt_window: int = 50,
        max_events: int = 10_000,
    ) -> None:
        self.url = url
        self.baudrate = baudrate
        self._clock = clock
        self.heartbeat_interval_s = heartbeat_interval_s
        self.retransmit_timeout_s = retransmit_timeout_s
        self.max_retries = max_retries
        self.belt_clock = BeltClock(belt_window)

        self._ser: Any = None
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._tx_lock = threading.Lock()
        self._tx_seq = 0
        self._frames_tx = 0  # frames written to the port (under _tx_lock)
        self._state = threading.Condition(threading.RLock())
        self._decoder = FrameDecoder()

        self._hello: Hello | None = None
        self._hello_seen = threading.Event()
        self._peer_hello_other_version: Hello | None = None
        self._mcu_status: Status | None = None
        self._last_mcu_time_us: int | None = None
        self._last_configure: Configure | None = None
        self._config_waiters: dict[int, _ConfigWaiter] = {}
        self._pending: dict[int, _Pending] = {}
        self._outstanding: set[int] = set()  # acked FireAt not yet fired / cancelled / ended
        self._boot_id: int | None = None  # the MCU boot this link talks to (Hello, Heartbeat or an event)
        self._retired_boots: set[int] = set()
        self._seen_events: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._finished: OrderedDict[int, None] = OrderedDict()  # command ids whose final outcome was emitted
        self._events: deque[LinkEvent] = deque()
        self._max_events = max_events
        self._heartbeats_enabled = True
        self._io_error: str | None = None

        self._rtts: deque[float] = deque(maxlen=200)
        self._naks: Counter[str] = Counter()
        self._retries = 0
        self._timeouts = 0
        self._resets = 0
        self._rx_seq_gaps = 0
        self._rx_expected_seq: int | None = None
        self._events_dropped = 0
        self._bad_messages = 0
        self._last_rx_mono: float | None = None
        self._events_rx = 0
        self._hellos_rx = 0
        self._reconfigure_due: float | None = None  # re-send the Configure after a reset until acked
        self._event_dups = 0
        self._resolved_after_timeout = 0

    # ----------------------------------------------------------------- lifecycle
    def open(self, timeout: float = 2.0) -> Hello:
        """Open the port, start the I/O thread and wait for the MCU's Hello."""
        if self._thread is not None:
            raise LinkError(f"link to {self.url} is already open")
        return self._connect(timeout)

    def reopen(self, timeout: float = 2.0) -> Hello:
        """Close the port and open it again (a USB re-enumeration, a cable re-plugged), keeping every command.

        Commands still unanswered are re-sent; events the MCU re-sends are matched to the commands they
        belong to. If the MCU reset meanwhile, its Hello says so and the usual reset handling follows.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self._thread = None
        if self._ser is not None:
            try:
                self._ser.close()
            except Exception:
                log.debug("error closing %s", self.url, exc_info=True)
            self._ser = None
        self._hello_seen.clear()
        self._decoder.reset()
        self._rx_expected_seq = None
        self._io_error = None
        return self._connect(timeout)

    def _connect(self, timeout: float) -> Hello:
        try:
            self._ser = serial.serial_for_url(self.url, baudrate=self.baudrate, timeout=0)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkError(
                f"cannot open {self.url!r}: {exc}. Check the port name (ls /dev/ttyUSB* /dev/ttyACM*), that "
                "your user may use it (dialout group), and that no other program holds it."
            ) from exc
        try:
            self._fd = self._ser.fileno()
        except Exception:
            self._fd = None  # loop:// and friends: no fd to select on, poll instead
        self._stop.clear()
        self._thread = threading.Thread(target=self._io_loop, name=f"diverter-link {self.url}", daemon=True)
        self._thread.start()
        if not self._hello_seen.wait(timeout):
            self.close()
            raise LinkError(
                f"no Hello from the diverter MCU on {self.url!r} within {timeout:.1f} s. Check that the MCU is "
                f"powered and flashed with Kozan firmware, the cable, and the baud rate ({self.baudrate}); for "
                "the simulator, that it is running and this is its slave path."
            )
        hello = self._hello
        peer = self._peer_hello_other_version
        if peer is not None and hello is None:
            hello = peer
        assert hello is not None
        if hello.protocol_version != PROTOCOL_VERSION:
            self.close()
            raise LinkError(
                f"MCU on {self.url!r} speaks protocol v{hello.protocol_version}, this host speaks "
                f"v{PROTOCOL_VERSION}: flash matching firmware or update the host software."
            )
        log.info(
            "diverter MCU on %s: boot_id %08x, firmware %d.%d", self.url, hello.boot_id,
            hello.fw_version >> 8, hello.fw_version & 0xFF,
        )
        return hello

    def close(self) -> None:
        """Stop the I/O thread and close the port. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self._thread = None
        if self._ser is not None:
            try:
                self._ser.close()
            except Exception:  # closing a dead port must not mask the reason we are closing
                log.debug("error closing %s", self.url, exc_info=True)
            self._ser = None

    def __enter__(self) -> DiverterLink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- commands
    def configure(
        self,
        mm_per_count: float,
        diverters: Iterable[DiverterSetup],
        watchdog_ms: int = 250,
        report_interval_ms: int = 20,
        timeout: float = 1.0,
    ) -> None:
        """Send Configure and block until the MCU acks it (re-sent every 100 ms; it is idempotent).

        The configuration is remembered and re-sent automatically if the MCU resets.
        """
        msg = Configure(float(mm_per_count), tuple(diverters), int(watchdog_ms), int(report_interval_ms))
        validate_configure(msg)
        self._require_open()
        waiter = _ConfigWaiter()
        deadline = time.monotonic() + timeout
        with self._state:
            self._last_configure = msg
        try:
            while True:
                with self._state:
                    if waiter.first_sent is None:
                        waiter.first_sent = time.monotonic()
                    else:
                        waiter.resent = True
                    self._config_waiters[self._send(msg)] = waiter
                remaining = deadline - time.monotonic()
                if waiter.done.wait(max(0.0, min(CONFIGURE_RESEND_S, remaining))):
                    break
                if time.monotonic() >= deadline:
                    raise LinkError(
                        f"the MCU on {self.url!r} did not acknowledge Configure within {timeout:.1f} s; it "
                        f"is alive if health()['last_rx_age_s'] is small. Check the link health: {self.health()}"
                    )
        finally:
            with self._state:
                for seq in [s for s, w in self._config_waiters.items() if w is waiter]:
                    del self._config_waiters[seq]
        if isinstance(waiter.answer, Nak):
            raise LinkError(
                f"the MCU rejected Configure ({waiter.answer.reason.name}): {msg}. Allowed: mm_per_count > 0, "
                "watchdog_ms >= 20, report_interval_ms >= 1, unique diverter ids, max_on_ms >= 1."
            )

    def fire_at(self, command_id: int, diverter: int, belt_count: int, pulse_ms: float) -> None:
        """Queue "fire ``diverter`` when the belt is at ``belt_count``"; returns at once.

        The outcome arrives as events. ``command_id`` must be unique for the MCU's boot (use a counter).
        """
        self._submit(FireAt(int(command_id), int(diverter), int(belt_count), _pulse(pulse_ms)))

    def fire_now(self, command_id: int, diverter: int, pulse_ms: float) -> None:
        """Fire immediately (technicians' test button; never used for sorting)."""
        self._submit(FireNow(int(command_id), int(diverter), _pulse(pulse_ms)))

    def cancel(self, command_id: int) -> None:
        """Ask the MCU to drop a queued command; answered by an AckEvent or a NakEvent(NOT_QUEUED)."""
        self._require_open()
        with self._state:
            self._send(Cancel(int(command_id)))

    def ping(self, timeout: float = 0.5) -> float | None:
        """Round trip of an Identify answered by a Hello, in seconds (None: no answer). Changes nothing on
        the MCU, so technicians can use it on a live line (``kozan firmware ping``)."""
        self._require_open()
        with self._state:
            before = self._hellos_rx
            t0 = time.monotonic()
            self._send(Identify())
            if not self._state.wait_for(lambda: self._hellos_rx > before, timeout):
                return None
            return time.monotonic() - t0

    def poll_events(self) -> list[LinkEvent]:
        """Everything that happened since the last call, oldest first."""
        with self._state:
            events = list(self._events)
            self._events.clear()
        return events

    def wait_settled(self, timeout: float) -> bool:
        """Block until every FireAt/FireNow sent has an answer (ack, nak, fired) or has timed out."""
        with self._state:
            return self._state.wait_for(lambda: all(p.timed_out for p in self._pending.values()), timeout)

    def wait_resolved(self, timeout: float) -> bool:
        """Block until every command sent has its final outcome: fired, ended (Nak, Ended) or lost in a reset.

        A command that timed out is still re-sent until the MCU answers it, so this also waits for those."""
        with self._state:
            return self._state.wait_for(lambda: not self._pending and not self._outstanding, timeout)

    # ----------------------------------------------------------------- state
    @property
    def hello(self) -> Hello | None:
        return self._hello

    @property
    def mcu_status(self) -> Status | None:
        """The MCU's latest Status (queue depth, e-stop, configured, watchdog tripped)."""
        return self._mcu_status

    @property
    def heartbeats_enabled(self) -> bool:
        return self._heartbeats_enabled

    @heartbeats_enabled.setter
    def heartbeats_enabled(self, enabled: bool) -> None:
        """Turning heartbeats off simulates a stalled host (tests, commissioning the MCU watchdog)."""
        self._heartbeats_enabled = bool(enabled)

    def health(self) -> dict[str, Any]:
        with self._state:
            stats = self._decoder.stats
            return {
                "rtt_ms": statistics.median(self._rtts) * 1000.0 if self._rtts else None,
                "retries": self._retries,
                "timeouts": self._timeouts,
                "resyncs": stats.resyncs,
                "crc_errors": stats.crc_errors,
                "bytes_discarded": stats.bytes_discarded,
                "frames_rx": stats.frames_ok,
                "frames_tx": self._frames_tx,
                "bad_messages": self._bad_messages,
                "rx_seq_gaps": self._rx_seq_gaps,
                "naks": dict(self._naks),
                "resets": self._resets,
                "last_rx_age_s": (time.monotonic() - self._last_rx_mono) if self._last_rx_mono else None,
                "pending": len(self._pending),
                "unresolved": sum(1 for p in self._pending.values() if p.timed_out),
                "resolved_after_timeout": self._resolved_after_timeout,
                "outstanding": len(self._outstanding),
                "events_rx": self._events_rx,
                "event_dups": self._event_dups,
                "events_dropped": self._events_dropped,
                "boot_id": self._boot_id,
                "mcu_status": asdict(self._mcu_status) if self._mcu_status else None,
                "io_error": self._io_error,
            }

    # ----------------------------------------------------------------- internals: sending
    def _require_open(self) -> None:
        if self._io_error is not None:
            raise LinkError(f"the serial link to {self.url!r} failed: {self._io_error}; close() and open() it again")
        if self._ser is None or self._thread is None:
            raise LinkError(f"the link to {self.url!r} is not open; call open() first")

    def _submit(self, msg: FireAt | FireNow) -> None:
        msg.encode_payload()  # range check before anything is registered
        self._require_open()
        with self._state:
            if msg.command_id in self._pending:
                raise ValueError(f"command {msg.command_id} is already in flight; command ids must be unique")
            now = time.monotonic()
            self._pending[msg.command_id] = _Pending(msg, now, now)
            self._send(msg)

    def _send(self, msg: Message) -> int:
        """Write one frame; returns its seq. Safe from any thread."""
        with self._tx_lock:
            seq = self._tx_seq
            self._tx_seq = (seq + 1) & 0xFF
            data = encode_message(msg, seq)
            ser = self._ser
            if ser is None:
                raise LinkError(f"the link to {self.url!r} is closed")
            try:
                ser.write(data)
            except (serial.SerialException, OSError) as exc:
                raise LinkError(f"writing to {self.url!r} failed: {exc}") from exc
            self._frames_tx += 1
        return seq

    def _emit(self, event: LinkEvent) -> None:
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self._events_dropped += 1
        self._events.append(event)

    # ----------------------------------------------------------------- internals: I/O thread
    def _io_loop(self) -> None:
        next_heartbeat = 0.0
        next_identify = 0.0
        try:
            while not self._stop.is_set():
                ser = self._ser
                data = ser.read(ser.in_waiting or 1)
                if data:
                    self._last_rx_mono = time.monotonic()
                    for frame in self._decoder.feed(data):
                        self._on_frame(frame)
                now = time.monotonic()
                if self._heartbeats_enabled and now >= next_heartbeat:
                    self._send(Heartbeat(0))
                    next_heartbeat = now + self.heartbeat_interval_s
                if not self._hello_seen.is_set() and now >= next_identify:
                    self._send(Identify())
                    next_identify = now + IDENTIFY_PERIOD_S
                self._retransmit(now)
                if not data:
                    self._wait_readable()
        except (serial.SerialException, OSError, LinkError) as exc:
            if self._stop.is_set():
                return  # the port was closed under us on purpose
            self._io_error = str(exc)
            log.error("diverter link %s failed: %s; outstanding commands will not fire", self.url, exc)
            with self._state:
                self._emit(LinkErrorEvent(self._clock(), str(exc)))
                self._state.notify_all()
        except Exception:
            log.exception("diverter link %s I/O thread crashed", self.url)
            self._io_error = "I/O thread crashed (see log)"
            raise

    def _wait_readable(self) -> None:
        if self._fd is None:
            time.sleep(POLL_S)
            return
        try:
            select.select([self._fd], [], [], POLL_S)
        except (OSError, ValueError):
            time.sleep(POLL_S)

    def _retransmit(self, now: float) -> None:
        with self._state:
            if self._reconfigure_due is not None and now >= self._reconfigure_due and self._last_configure:
                self._reconfigure_due = now + CONFIGURE_RESEND_S
                self._send(self._last_configure)
            for cid, p in list(self._pending.items()):
                if now - p.last_sent < (RESOLVE_INTERVAL_S if p.timed_out else self.retransmit_timeout_s):
                    continue
                if p.attempts > self.max_retries and not p.timed_out:
                    # Tell the station now (the item is probably missed), but keep asking: the MCU's answer
                    # to a re-send is its first answer (de-dup by command_id), or Nak(LATE) if it never got
                    # the command and the belt has passed; so the final outcome is always learnt.
                    p.timed_out = True
                    self._timeouts += 1
                    log.warning("command %d: no answer after %d transmissions; item probably missed", cid,
                                p.attempts)
                    self._emit(CommandTimeoutEvent(self._clock(), cid, p.attempts))
                    self._state.notify_all()
                p.attempts += 1
                p.last_sent = now
                self._retries += 1
                log.debug("command %d: retransmission %d", cid, p.attempts - 1)
                self._send(p.msg)

    def _on_frame(self, frame: Frame) -> None:
        try:
            msg = decode_message(frame)
        except ProtocolVersionMismatch as exc:
            self._bad_messages += 1
            log.error("%s", exc)
            if frame.msg_type == MsgType.HELLO and self._hello is None:
                # Hello's layout is the same in every protocol version (PROTOCOL.md §8), so that open() can
                # say which versions disagree instead of "no Hello".
                try:
                    self._peer_hello_other_version = Hello.decode_payload(frame.payload)
                    self._hello_seen.set()
                except ProtocolError:
                    pass
            return
        except ProtocolError as exc:
            self._bad_messages += 1
            log.warning("dropping MCU frame: %s", exc)
            return
        if not isinstance(msg, Hello) and self._rx_expected_seq is not None and frame.seq != self._rx_expected_seq:
            self._rx_seq_gaps += (frame.seq - self._rx_expected_seq) & 0xFF
        self._rx_expected_seq = (frame.seq + 1) & 0xFF
        with self._state:
            self._dispatch(msg)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, EncoderReport):
            self.belt_clock.add(self._clock(), msg.count)
        elif isinstance(msg, Heartbeat):
            if self._current_boot(msg.boot_id):
                self._last_mcu_time_us = msg.mcu_time_us
        elif isinstance(msg, (Fired, Ended, Fault)):
            self._on_event(msg)
        elif isinstance(msg, Status):
            self._mcu_status = msg
        elif isinstance(msg, Ack):
            self._on_ack(msg)
        elif isinstance(msg, Nak):
            self._on_nak(msg)
        elif isinstance(msg, Hello):
            self._on_hello(msg)
        else:
            log.warning("unexpected %s from the MCU; ignored", type(msg).__name__)

    # ----------------------------------------------------------------- internals: MCU events
    def _current_boot(self, boot_id: int) -> bool:
        """True if ``boot_id`` is the MCU boot this link talks to; a new one is handled as a reset."""
        if boot_id == self._boot_id:
            return True
        if boot_id in self._retired_boots:
            return False  # a straggler from before a reset
        if self._boot_id is None:
            self._boot_id = boot_id
            return True
        self._on_new_boot(boot_id)
        try:
            self._send(Identify())  # the Hello of that boot was lost on the line: ask for it
        except LinkError:
            pass
        return True

    def _on_event(self, msg: Fired | Ended | Fault) -> None:
        """An MCU event: ack it (every copy: our ack may have been lost), act on the first copy only."""
        if not self._current_boot(msg.boot_id):
            return
        try:
            self._send(EventAck(msg.boot_id, msg.event_seq))
        except LinkError:
            pass  # the port is going away; the MCU re-sends, and a re-opened link acks then
        key = (msg.boot_id, msg.event_seq)
        if key in self._seen_events:
            self._event_dups += 1
            return
        self._seen_events[key] = None
        while len(self._seen_events) > DEDUP_MEMORY:
            self._seen_events.popitem(last=False)
        self._events_rx += 1
        now = self._clock()
        if isinstance(msg, Fault):
            log.warning("MCU fault %s (detail %d)", msg.code.name, msg.detail)
            self._emit(FaultEvent(now, msg.code, msg.detail))
            return
        self._settle(msg.command_id)
        if isinstance(msg, Fired):
            self._finish(msg.command_id)
            self._emit(FiredEvent(now, msg.command_id, msg.diverter, msg.actual_count, msg.mcu_time_us))
        elif msg.reason == NakReason.CANCELLED:
            if self._finish(msg.command_id):
                self._emit(AckEvent(now, msg.command_id, MsgType.CANCEL))
        elif self._finish(msg.command_id):
            self._naks[msg.reason.name] += 1
            log.info("command %d: ended by the MCU (%s)", msg.command_id, msg.reason.name)
            self._emit(NakEvent(now, msg.command_id, msg.reason, MsgType.FIRE_AT))
        self._state.notify_all()

    def _settle(self, command_id: int) -> None:
        """The MCU has answered for ``command_id``: it is no longer pending (or outstanding)."""
        p = self._pending.pop(command_id, None)
        if p is not None and p.timed_out:
            self._resolved_after_timeout += 1
        self._outstanding.discard(command_id)

    def _finish(self, command_id: int) -> bool:
        """Mark a command's final outcome as told; False if it was told already."""
        if command_id in self._finished:
            return False
        self._finished[command_id] = None
        while len(self._finished) > DEDUP_MEMORY:
            self._finished.popitem(last=False)
        return True

    def _on_ack(self, msg: Ack) -> None:
        if msg.msg_type in (MsgType.FIRE_AT, MsgType.FIRE_NOW):
            p = self._pending.pop(msg.command_id, None)
            if p is None:
                return  # duplicate ack of a retransmission (or already fired): already reported
            if p.timed_out:
                self._resolved_after_timeout += 1
            self._state.notify_all()
            if msg.command_id in self._finished:
                return  # its Fired/Ended overtook the Ack (the Ack was lost): the outcome is out already
            if p.attempts == 1:
                self._rtts.append(time.monotonic() - p.first_sent)
            if msg.msg_type == MsgType.FIRE_AT:
                self._outstanding.add(msg.command_id)
            self._emit(AckEvent(self._clock(), msg.command_id, msg.msg_type))
            self._state.notify_all()
        elif msg.msg_type == MsgType.CONFIGURE:
            self._reconfigure_due = None
            waiter = self._config_waiters.get(msg.seq)
            if waiter is not None and not waiter.done.is_set():
                if not waiter.resent and waiter.first_sent is not None:
                    self._rtts.append(time.monotonic() - waiter.first_sent)
                waiter.answer = msg
                waiter.done.set()
            self._emit(AckEvent(self._clock(), 0, msg.msg_type))
        elif msg.msg_type == MsgType.CANCEL:
            self._outstanding.discard(msg.command_id)
            if self._finish(msg.command_id):
                self._emit(AckEvent(self._clock(), msg.command_id, msg.msg_type))
            self._state.notify_all()

    def _on_nak(self, msg: Nak) -> None:
        if msg.msg_type in (MsgType.FIRE_AT, MsgType.FIRE_NOW):
            p = self._pending.pop(msg.command_id, None)
            if p is None:
                return  # duplicate answer to a retransmission
            if p.timed_out:
                self._resolved_after_timeout += 1
            self._outstanding.discard(msg.command_id)
            self._state.notify_all()
            if not self._finish(msg.command_id):
                return  # a re-submitted id whose outcome was told already
        elif msg.msg_type == MsgType.CONFIGURE:
            waiter = self._config_waiters.get(msg.seq)
            if waiter is not None:
                waiter.answer = msg
                waiter.done.set()
            else:
                log.error("MCU rejected the automatic re-Configure after reset (%s)", msg.reason.name)
        self._naks[msg.reason.name] += 1
        log.info("command %d: NAK %s (msg type 0x%02x)", msg.command_id, msg.reason.name, msg.msg_type)
        self._emit(NakEvent(self._clock(), msg.command_id, msg.reason, msg.msg_type))

    def _on_hello(self, msg: Hello) -> None:
        self._hellos_rx += 1
        self._state.notify_all()
        if msg.boot_id in self._retired_boots:
            return
        first = self._boot_id is None
        same_boot = self._boot_id == msg.boot_id
        self._hello = msg
        if first or same_boot:
            self._boot_id = msg.boot_id
            self._hello_seen.set()
            return
        self._on_new_boot(msg.boot_id)
        self._hello_seen.set()

    def _on_new_boot(self, boot_id: int) -> None:
        """The MCU reset (a new boot_id in a Hello, Heartbeat or event): its queue and events are gone."""
        if self._boot_id is not None:
            self._retired_boots.add(self._boot_id)
        self._boot_id = boot_id
        self._resets += 1
        # Unanswered commands are lost too, and are not retransmitted to the new boot: the old boot may have
        # fired them (Ack and Fired lost on the wire), and their belt counts are in the old boot's encoder
        # coordinates. Re-sending them could fire a second time, or at the wrong place.
        lost = tuple(sorted(self._outstanding | set(self._pending)))
        self._outstanding.clear()
        self._pending.clear()
        self.belt_clock.reset()
        reconfigure = self._last_configure is not None
        if self._last_configure is not None:
            self._send(self._last_configure)
            self._reconfigure_due = time.monotonic() + CONFIGURE_RESEND_S  # until acked: it may be lost
        for cid in lost:
            self._finish(cid)
        log.warning(
            "diverter MCU reset (new boot_id %08x): %d queued commands lost %s; %s",
            boot_id, len(lost), list(lost), "re-sent Configure" if reconfigure else "not configured yet",
        )
        self._emit(ResetEvent(self._clock(), boot_id, lost, reconfigure))
        self._state.notify_all()
