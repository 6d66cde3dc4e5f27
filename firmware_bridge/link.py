"""Host side of the diverter link (PROTOCOL.md §4–§7), on pyserial.

One I/O thread reads the port, dispatches answers, sends heartbeats and retransmits unanswered
commands. Callers (the station loop) only ever queue frames and drain events, so a slow station loop
never delays a heartbeat and a stalled port never blocks the station loop for longer than a write.

Two clocks, on purpose: transport timers (heartbeat, retransmit, round-trip time, reconnect backoff) always
run on ``time.monotonic`` because they are about the wire; everything about the belt (BeltClock samples, the
MCU clock estimate, event stamps) uses the injected ``clock``, so a virtual-time simulation stays
deterministic.

A port that fails (cable pulled, USB re-enumeration, the far end closed) is re-opened by the I/O thread
itself, with exponential backoff (``reconnect_initial_s`` doubling to ``reconnect_max_s``): a line must not
need a person to type ``reopen()``. The station hears ``LinkErrorEvent`` (with the commands in doubt) when the
port goes and ``LinkRestoredEvent`` when the MCU answers again; the MCU's boot id then decides whether it
reset (its queue lost, reported, configuration re-sent) or ran on (commands resolved as usual).

Reconnecting by path is only right for a name that stays with the device (``/dev/ttyACM0``, a udev symlink).
A pseudo-terminal slave (``/dev/pts/N``) is not such a name: once its pair is torn down the kernel hands the
number to the next process that asks, so re-opening it would write our frames into someone else's terminal.
So a link opened directly on a pty slave never re-opens it (``LinkErrorEvent.reconnecting`` is False); one
opened through a symlink to a pty re-opens only after the symlink itself was replaced (the device came back
under its stable name). And after any re-open the link sends nothing but Identify, and acts on nothing but a
Hello of its own protocol version, until that Hello has identified the MCU: no heartbeat, no retransmission,
no Configure, no fire reaches a port before we know who is on it. ``close()`` stops every re-open at once.
"""

from __future__ import annotations

import logging
import math
import os
import re
import select
import stat
import statistics
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import serial

from .belt_clock import BeltClock, BeltClockNotReady
from .clock_sync import McuClock, McuClockNotReady
from .events import (
    AckEvent,
    CommandTimeoutEvent,
    FaultEvent,
    FiredEvent,
    InputEdgeEvent,
    LinkErrorEvent,
    LinkEvent,
    LinkRestoredEvent,
    NakEvent,
    ResetEvent,
)
from .framing import Frame, FrameDecoder
from .messages import (
    MAX_DIVERTERS,
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
REQUEST_TYPES = (MsgType.CONFIGURE, MsgType.BELT_RUN, MsgType.ARM, MsgType.GATE_SETUP)  # idempotent, answered by seq


class LinkError(RuntimeError):
    """The link cannot do what was asked; the message says what to check."""


_PTY_SLAVE_MAJORS = range(136, 144)  # Linux Unix98 pty slaves (/dev/pts/N)


def is_pty_slave(path: str) -> bool:
    """True if ``path`` (after symlinks) is a pseudo-terminal slave: a name the kernel re-uses."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except (OSError, ValueError):
        return False
    if not stat.S_ISCHR(st.st_mode):
        return False
    return (real.startswith("/dev/pts/") or os.major(st.st_rdev) in _PTY_SLAVE_MAJORS
            or re.fullmatch(r"/dev/ttys\d+", real) is not None)


def _name_identity(path: str) -> tuple[int, int, int] | None:
    """The directory entry ``path`` itself (not its target): changes when a symlink is replaced."""
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


@dataclass
class _Pending:
    msg: FireAt | FireNow
    first_sent: float
    last_sent: float
    attempts: int = 1
    timed_out: bool = False  # CommandTimeoutEvent emitted; still re-sent until the MCU answers


class _ConfigWaiter:
    """One blocking request (Configure, BeltRun, Arm): every copy's seq maps here until an answer."""

    def __init__(self, msg_type: int = MsgType.CONFIGURE) -> None:
        self.msg_type = int(msg_type)
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
        reconnect: bool = True,
        reconnect_initial_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        clock_window: int = 500,
    ) -> None:
        if not 0 < reconnect_initial_s <= reconnect_max_s:
            raise ValueError(f"reconnect backoff: need 0 < reconnect_initial_s ({reconnect_initial_s}) <= "
                             f"reconnect_max_s ({reconnect_max_s})")
        self.url = url
        self.baudrate = baudrate
        self._clock = clock
        self.heartbeat_interval_s = heartbeat_interval_s
        self.retransmit_timeout_s = retransmit_timeout_s
        self.max_retries = max_retries
        self.belt_clock = BeltClock(belt_window)  # count against host receive time (jittery, always there)
        self.mcu_clock = McuClock(clock_window)  # MCU time against host time (PROTOCOL.md §7a)
        self.belt_on_mcu_clock = BeltClock(belt_window)  # count against MCU time (s): exact stamps
        self.reconnect = reconnect
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s

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
        self._config_waiters: dict[int, _ConfigWaiter] = {}  # Configure, BeltRun and Arm, by seq
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
        self._reconnects = 0  # successful automatic re-opens
        self._disconnects = 0  # ports lost
        self._reconnect_attempts = 0
        self._down_since: float | None = None  # monotonic time the port was lost (None: up)
        self._boot_at_loss: int | None = None
        self._restoring = False  # re-opened, waiting for the MCU's Hello
        self._estop_latched = False  # Fault(ESTOP) seen (or disarm()); only rearm() clears it
        self._disarm_due: float | None = None  # re-send Arm(0) after a reset until acked (latched e-stop)
        # What the port name was at the last successful open (see the module docstring): a pty slave opened
        # directly is never re-opened; a symlink to a pty only once the symlink itself has been replaced.
        self._direct_pty = False
        self._via_symlink_to_pty = False
        self._name_at_open: tuple[int, int, int] | None = None
        self._frames_dropped_unverified = 0  # frames received on a re-opened port before its Hello

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
        self.close()
        self._hello_seen.clear()
        self._decoder.reset()
        self._rx_expected_seq = None
        self._io_error = None
        self._down_since = None
        self._restoring = False
        return self._connect(timeout)

    def _note_port_name(self) -> None:
        """Remember what kind of name the port was opened by (before opening: no race with a re-point)."""
        pty = is_pty_slave(self.url)
        symlink = os.path.islink(self.url)
        self._direct_pty = pty and not symlink
        self._via_symlink_to_pty = pty and symlink
        self._name_at_open = _name_identity(self.url) if symlink else None

    def _connect(self, timeout: float) -> Hello:
        self._note_port_name()
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
        """Stop the I/O thread (and with it any re-open in progress) and close the port. Idempotent.

        After this returns nothing of this link opens or writes its port again: a re-open that was under way
        sees the stop under ``_tx_lock`` and closes what it opened instead of using it."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5.0)
            if t.is_alive():
                log.error("diverter link %s: I/O thread did not stop within 5 s", self.url)
        self._thread = None
        self._detach_port()

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
        with self._state:
            self._last_configure = msg
        answer = self._request(msg, timeout, "Configure")
        if isinstance(answer, Nak):
            raise LinkError(
                f"the MCU rejected Configure ({answer.reason.name}): {msg}. Allowed: mm_per_count > 0, "
                "watchdog_ms >= 20, report_interval_ms >= 1, unique diverter ids, max_on_ms >= 1."
            )

    def belt_run(self, run: bool, timeout: float = 1.0) -> None:
        """Run (True) or stop (False) the belt through the MCU's belt-run output (PROTOCOL.md §5a).

        Blocks until the MCU acks (re-sent every 100 ms: idempotent). Stopping is always accepted; running is
        refused (LinkError naming the reason) during an e-stop, before Configure, before the re-arm after an
        e-stop, or while the watchdog is tripped. Commands queued on the MCU stay queued while the belt
        stands: they are scheduled by belt position, so they fire at the right place once it runs again.
        """
        self._require_open()
        answer = self._request(BeltRun(1 if run else 0), timeout, "BeltRun")
        if isinstance(answer, Nak):
            raise LinkError(f"the MCU refused to {'run' if run else 'stop'} the belt: {answer.reason.name}"
                            + (" (re-arm it first: the operator's reset)" if answer.reason in
                               (NakReason.NOT_ARMED, NakReason.ESTOP) else ""))

    def rearm(self, timeout: float = 1.0) -> None:
        """The explicit re-arm after an e-stop (PROTOCOL.md §6): the operator has reset the line.

        Until this, the MCU answers every FireAt/FireNow with Nak(ESTOP) while the input is pressed and
        Nak(NOT_ARMED) after its release. Raises LinkError if the e-stop input is still pressed.
        """
        self._require_open()
        with self._state:
            self._disarm_due = None  # no Arm(0) re-send may overtake this re-arm (taken under the same lock)
        answer = self._request(Arm(1), timeout, "Arm")
        if isinstance(answer, Nak):
            raise LinkError(f"the MCU refused to re-arm ({answer.reason.name})"
                            + (": its e-stop input is still pressed; release it first" if
                               answer.reason == NakReason.ESTOP else ""))
        with self._state:
            self._estop_latched = False
            self._disarm_due = None

    def disarm(self, timeout: float = 1.0) -> None:
        """Software e-stop on the MCU: outputs and belt off, queue cancelled (Ended(NOT_ARMED) each), every
        fire refused until :meth:`rearm`. Latched here too, so an MCU reset cannot re-arm it behind our back.

        Until the MCU acks it the I/O thread also re-sends Arm(0) every 100 ms, so a disarm that times out
        here (the port down, a lost frame) still reaches the MCU once the port is back."""
        self._require_open()
        with self._state:
            self._estop_latched = True
            self._disarm_due = time.monotonic()
        self._request(Arm(0), timeout, "Arm")

    def gate_setup(self, inputs: Iterable[int], timeout: float = 1.0) -> None:
        """Ask the MCU to report these digital inputs (0..31: light gates, actuator sensors) as
        ``InputEdgeEvent``s, stamped with the encoder count and MCU time at the edge (PROTOCOL.md §6b).
        Replaces the previous set; ``[]`` stops the reports. An MCU reset forgets it (call again after a
        ``ResetEvent``). Raises LinkError if the firmware has no gate inputs (Nak UNSUPPORTED)."""
        mask = 0
        for i in inputs:
            if not 0 <= int(i) < 32:
                raise ValueError(f"gate input {i} out of range: inputs are 0..31")
            mask |= 1 << int(i)
        self._require_open()
        answer = self._request(GateSetup(mask), timeout, "GateSetup")
        if isinstance(answer, Nak):
            raise LinkError(f"the MCU refused GateSetup ({answer.reason.name})"
                            + (": its firmware does not report gate inputs; flash firmware with PROTOCOL.md §6b"
                               if answer.reason == NakReason.UNSUPPORTED else ""))

    @property
    def estop_latched(self) -> bool:
        """True from an MCU ``Fault(ESTOP)`` (or :meth:`disarm`) until :meth:`rearm` succeeds."""
        return self._estop_latched

    def _request(self, msg: Configure | BeltRun | Arm | GateSetup, timeout: float, what: str) -> Ack | Nak:
        """Send an idempotent request and block until the MCU answers it (re-sent every 100 ms)."""
        waiter = _ConfigWaiter(msg.TYPE)
        deadline = time.monotonic() + timeout
        try:
            while True:
                with self._state:
                    if waiter.first_sent is None:
                        waiter.first_sent = time.monotonic()
                    else:
                        waiter.resent = True
                    try:
                        self._config_waiters[self._send(msg)] = waiter
                    except LinkError:
                        if self._down_since is None:
                            raise
                        # the port is being re-opened: keep trying until the deadline (idempotent request)
                remaining = deadline - time.monotonic()
                if waiter.done.wait(max(0.0, min(CONFIGURE_RESEND_S, remaining))):
                    break
                if time.monotonic() >= deadline:
                    raise LinkError(
                        f"the MCU on {self.url!r} did not acknowledge {what} within {timeout:.1f} s; it "
                        f"is alive if health()['last_rx_age_s'] is small. Check the link health: {self.health()}"
                    )
        finally:
            with self._state:
                for seq in [s for s, w in self._config_waiters.items() if w is waiter]:
                    del self._config_waiters[seq]
        assert waiter.answer is not None
        return waiter.answer

    def fire_at(self, command_id: int, diverter: int, belt_count: int, pulse_ms: float) -> None:
        """Queue "fire ``diverter`` when the belt is at ``belt_count``"; returns at once.

        The outcome arrives as events. ``command_id`` must be unique for the MCU's boot (use a counter).
        """
        self._submit(FireAt(int(command_id), int(diverter), int(belt_count), _pulse(pulse_ms)))

    def fire_now(self, command_id: int, diverter: int, pulse_ms: float) -> None:
        """Fire immediately (technicians' test button; never used for sorting).

        Refused (LinkError) while the port is down or being re-opened: "now" must not become "whenever the
        cable is back"."""
        self._submit(FireNow(int(command_id), int(diverter), _pulse(pulse_ms)))

    def cancel(self, command_id: int) -> None:
        """Ask the MCU to drop a queued command; answered by an AckEvent or a NakEvent(NOT_QUEUED).

        Sent once; while the port is being re-opened it is dropped (as if lost on the line)."""
        self._require_open()
        with self._state:
            try:
                self._send(Cancel(int(command_id)))
            except LinkError:
                if self._down_since is None:
                    raise
                # Lost with the port, like a Cancel lost on the line (PROTOCOL.md §5): the command's own
                # Fired or Ended still tells how it ended once the link is back.
                log.warning("command %d: Cancel not sent, the port is being re-opened", command_id)

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

    def belt_count_at(self, host_time_s: float) -> float:
        """Belt count at host time ``host_time_s`` (the link's clock; e.g. a frame's capture time).

        Through the MCU clock when its estimate is ready (host time -> MCU time -> count, from the exactly
        stamped EncoderReports); otherwise from ``belt_clock`` (counts against host receive times).
        Raises BeltClockNotReady when neither can answer yet.
        """
        if self.mcu_clock.ready and self.belt_on_mcu_clock.ready:
            try:  # an MCU reset on the I/O thread may empty both between the check and the use
                return self.belt_on_mcu_clock.count_at(self.mcu_clock.mcu_time_us_at(host_time_s) / 1e6)
            except (McuClockNotReady, BeltClockNotReady):
                pass
        return self.belt_clock.count_at(host_time_s)

    def clock_health(self) -> dict[str, Any] | None:
        """The MCU clock estimate in figures (None before it is ready)."""
        e = self.mcu_clock.estimate_or_none()
        if e is None:
            return None
        return {"drift_ppm": round(e.drift_ppm, 2), "offset_us": round(e.offset_us, 1), "samples": e.samples,
                "residual_median_us": round(e.residual_median_us, 1),
                "residual_p99_us": round(e.residual_p99_us, 1)}

    @property
    def connected(self) -> bool:
        """The port is open and no loss is being recovered from."""
        return self._ser is not None and self._down_since is None and self._thread is not None

    def health(self) -> dict[str, Any]:
        clock = self.clock_health()
        with self._state:
            stats = self._decoder.stats
            return {
                "connected": self.connected,
                "reconnects": self._reconnects,
                "disconnects": self._disconnects,
                "reconnect_attempts": self._reconnect_attempts,
                "frames_dropped_unverified": self._frames_dropped_unverified,
                "down_s": (time.monotonic() - self._down_since) if self._down_since is not None else 0.0,
                "estop_latched": self._estop_latched,
                "clock": clock,
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
        if self._thread is None or not self._thread.is_alive():
            if self._io_error is not None:
                raise LinkError(f"the serial link to {self.url!r} failed: {self._io_error}; close() and open() "
                                "it again")
            raise LinkError(f"the link to {self.url!r} is not open; call open() first")

    def _submit(self, msg: FireAt | FireNow) -> None:
        msg.encode_payload()  # range check before anything is registered
        self._require_open()
        with self._state:
            if msg.command_id in self._pending:
                raise ValueError(f"command {msg.command_id} is already in flight; command ids must be unique")
            if isinstance(msg, FireNow) and self._down_since is not None:
                # _on_port_lost sets _down_since before it drops in-doubt FireNows under this lock
                raise LinkError(f"the port {self.url!r} is down (being re-opened): fire-now refused, try "
                                "again once it is back")
            now = time.monotonic()
            self._pending[msg.command_id] = _Pending(msg, now, now)
            try:
                self._send(msg)
            except LinkError:
                # The port is down and being re-opened: the command waits in _pending and is sent once the
                # MCU answers again. It is scheduled by belt position, so it fires in place or is Nak(LATE).
                log.warning("command %d: port down, sent after the reconnect", msg.command_id)

    def _send(self, msg: Message) -> int:
        """Write one frame; returns its seq. Safe from any thread.

        On a re-opened port whose MCU has not said Hello yet only Identify goes out (LinkError otherwise,
        which callers treat as "the port is being re-opened")."""
        with self._tx_lock:
            ser = self._ser
            if ser is None or self._stop.is_set():
                raise LinkError(f"the link to {self.url!r} is closed")
            if self._restoring and not isinstance(msg, Identify):
                raise LinkError(f"the port {self.url!r} was re-opened and its MCU has not said Hello yet")
            seq = self._tx_seq
            self._tx_seq = (seq + 1) & 0xFF
            data = encode_message(msg, seq)
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
        try:
            while not self._stop.is_set():
                try:
                    self._serve()
                    return  # stopped on purpose
                except (serial.SerialException, OSError, LinkError) as exc:
                    if self._stop.is_set():
                        return  # the port was closed under us on purpose
                    reconnecting = self._may_reconnect()
                    self._on_port_lost(str(exc), reconnecting)
                    if not reconnecting or not self._reopen_with_backoff():
                        return
        except Exception:
            log.exception("diverter link %s I/O thread crashed", self.url)
            self._io_error = "I/O thread crashed (see log)"
            raise

    def _serve(self) -> None:
        """Read, dispatch, heartbeat, retransmit, until stopped; raises when the port fails."""
        next_heartbeat = 0.0
        next_identify = 0.0
        while not self._stop.is_set():
            ser = self._ser
            if ser is None:
                raise LinkError("port closed")
            data = ser.read(ser.in_waiting or 1)
            if data:
                self._last_rx_mono = time.monotonic()
                rx_time = self._clock()  # one receive instant for the chunk: what the MCU clock fit sees
                for frame in self._decoder.feed(data):
                    self._on_frame(frame, rx_time)
            now = time.monotonic()
            if not self._hello_seen.is_set() and now >= next_identify:
                self._send(Identify())
                next_identify = now + IDENTIFY_PERIOD_S
            if self._restoring:
                # A re-opened port: nothing but Identify until the MCU's Hello says who is there.
                if not data:
                    self._wait_readable()
                continue
            if self._heartbeats_enabled and now >= next_heartbeat:
                self._send(Heartbeat(0))
                next_heartbeat = now + self.heartbeat_interval_s
            self._retransmit(now)
            if not data:
                self._wait_readable()

    def _may_reconnect(self) -> bool:
        """Whether a lost port may be re-opened by its name (see the module docstring)."""
        if not self.reconnect or self._stop.is_set():
            return False
        if self._direct_pty:
            log.error("diverter link %s: a pseudo-terminal slave is not re-opened by path (its number goes to "
                      "the next process that opens a pty); down until reopen() on the new path", self.url)
            return False
        return True

    def _detach_port(self) -> None:
        """Take the port away from the link (no write can reach it after this) and close it."""
        with self._tx_lock:
            ser, self._ser = self._ser, None
            self._restoring = False
        if ser is not None:
            try:
                ser.close()
            except Exception:  # closing a dead port must not mask the reason we are closing
                log.debug("error closing %s", self.url, exc_info=True)

    def _on_port_lost(self, why: str, reconnecting: bool) -> None:
        """Tell the station at once, naming every command whose outcome is now in doubt.

        A re-opened port that fails again before the MCU's Hello is the same outage, not a new one: the
        station was told once and hears one LinkRestoredEvent for it (its down time counted from the
        first loss). Nothing but Identify went out on the re-opened port, so no command came into doubt.
        """
        still_down = self._down_since is not None
        if not still_down:
            self._down_since = time.monotonic()  # first: a request failing to send now knows the port is going
            self._boot_at_loss = self._boot_id
        self._detach_port()
        self._io_error = why
        self._disconnects += 1
        self._hello_seen.clear()
        how = "re-opening with backoff" if reconnecting else "down until reopen()"
        if still_down:
            log.warning("diverter link %s: the re-opened port failed too (%s) before the MCU answered; still "
                        "down after %.2f s, %s", self.url, why, time.monotonic() - self._down_since, how)
            return
        with self._state:
            self._drop_fire_now_in_doubt()
            in_doubt = tuple(sorted(self._outstanding | set(self._pending)))
            log.error("diverter link %s failed: %s; %d commands in doubt %s; %s", self.url, why, len(in_doubt),
                      list(in_doubt), how)
            self._emit(LinkErrorEvent(self._clock(), why, in_doubt, reconnecting))
            self._state.notify_all()

    def _drop_fire_now_in_doubt(self) -> None:
        """An unanswered FireNow is not re-sent after the port comes back: the MCU would fire it then, however
        late (a FireNow has no belt position to be late against). It is reported timed out instead; should the
        MCU have fired it before the port went, its Fired event still arrives after the re-open."""
        for cid, p in list(self._pending.items()):
            if isinstance(p.msg, FireNow):
                del self._pending[cid]
                self._timeouts += 1
                log.warning("command %d: FireNow unanswered when the port went; not re-sent", cid)
                self._emit(CommandTimeoutEvent(self._clock(), cid, p.attempts))

    def _reopen_with_backoff(self) -> bool:
        """Re-open the port, waiting reconnect_initial_s, doubling to reconnect_max_s between tries.

        Returns False if the link was closed meanwhile. The MCU's Hello (Identify is sent every 200 ms)
        then completes the recovery in :meth:`_on_hello`."""
        delay = self.reconnect_initial_s
        while not self._stop.wait(delay):
            self._reconnect_attempts += 1
            next_delay = min(delay * 2, self.reconnect_max_s)
            if self._via_symlink_to_pty and _name_identity(self.url) == self._name_at_open:
                # Still the symlink that pointed at the lost pty: its target number may be anyone's by now.
                log.info("diverter link %s: still names the lost pseudo-terminal; next look in %.1f s", self.url,
                         next_delay)
                delay = next_delay
                continue
            name_before = _name_identity(self.url)
            pty_before = is_pty_slave(self.url)
            try:
                ser = serial.serial_for_url(self.url, baudrate=self.baudrate, timeout=0)
            except (serial.SerialException, OSError, ValueError) as exc:
                log.info("diverter link %s: re-open failed (%s); next try in %.1f s", self.url, exc, next_delay)
                delay = next_delay
                continue
            try:
                fd = ser.fileno()
            except Exception:
                fd = None
            with self._state:
                self._decoder.reset()
                self._rx_expected_seq = None
                with self._tx_lock:
                    if self._stop.is_set():  # close() came while opening: never use the port
                        try:
                            ser.close()
                        except Exception:
                            log.debug("error closing %s", self.url, exc_info=True)
                        return False
                    self._restoring = True
                    self._ser, self._fd = ser, fd
                    if os.path.islink(self.url):
                        self._via_symlink_to_pty = pty_before
                        self._name_at_open = name_before
            log.warning("diverter link %s: port re-opened after %.2f s; waiting for the MCU's Hello", self.url,
                        time.monotonic() - (self._down_since or time.monotonic()))
            return True
        return False

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
            if self._disarm_due is not None and now >= self._disarm_due:
                self._disarm_due = now + CONFIGURE_RESEND_S
                self._send(Arm(0))
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

    def _on_frame(self, frame: Frame, rx_time: float | None = None) -> None:
        if self._restoring and frame.msg_type != MsgType.HELLO:
            # Not identified yet: act on nothing. The MCU re-sends its events until they are acked.
            self._frames_dropped_unverified += 1
            return
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
            self._dispatch(msg, self._clock() if rx_time is None else rx_time)

    def _dispatch(self, msg: Message, rx_time: float) -> None:
        if isinstance(msg, EncoderReport):
            self.belt_clock.add(rx_time, msg.count)
            self.mcu_clock.add(rx_time, msg.mcu_time_us)
            self.belt_on_mcu_clock.add(msg.mcu_time_us / 1e6, msg.count)
        elif isinstance(msg, Heartbeat):
            if self._current_boot(msg.boot_id):
                self._last_mcu_time_us = msg.mcu_time_us
                self.mcu_clock.add(rx_time, msg.mcu_time_us)
        elif isinstance(msg, (Fired, Ended, Fault, InputEdge)):
            self._on_event(msg)
        elif isinstance(msg, Status):
            self._mcu_status = msg
            if (msg.estop or not msg.armed) and not self._estop_latched:
                # Pressed, or released and not re-armed (e.g. pressed at power-on, or seen by an earlier
                # host process): latch it here too, so only rearm() (the operator's reset) leaves it.
                log.warning("MCU reports %s", "its e-stop input pressed" if msg.estop else "not armed")
                self._estop_latched = True
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

    def _on_event(self, msg: Fired | Ended | Fault | InputEdge) -> None:
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
            if msg.code == FaultCode.ESTOP:
                self._estop_latched = True  # only rearm() (the operator's reset) clears it
            self._emit(FaultEvent(now, msg.code, msg.detail))
            return
        if isinstance(msg, InputEdge):
            self._emit(InputEdgeEvent(now, msg.input, bool(msg.rising), msg.count, msg.mcu_time_us))
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
        elif msg.msg_type in REQUEST_TYPES:
            if msg.msg_type == MsgType.CONFIGURE:
                self._reconfigure_due = None
            elif msg.msg_type == MsgType.ARM:
                self._disarm_due = None
            waiter = self._config_waiters.get(msg.seq)
            if waiter is not None and waiter.msg_type == msg.msg_type and not waiter.done.is_set():
                if not waiter.resent and waiter.first_sent is not None:
                    self._rtts.append(time.monotonic() - waiter.first_sent)
                waiter.answer = msg
                waiter.done.set()
            self._emit(AckEvent(self._clock(), 0, msg.msg_type))
        elif msg.msg_type == MsgType.CANCEL:
            # the MCU had it queued, so its FireAt arrived: no longer pending either, even if that Ack was lost
            # (else it is retransmitted after its end, and a later reset lists it lost: two final outcomes)
            self._settle(msg.command_id)
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
        elif msg.msg_type in REQUEST_TYPES:
            waiter = self._config_waiters.get(msg.seq)
            if waiter is not None and waiter.msg_type == msg.msg_type:
                if not waiter.done.is_set():
                    waiter.answer = msg
                    waiter.done.set()
                # The caller hears it as a LinkError naming the reason; as an event it would read like a
                # refused fire command (command id 0) to the station.
                self._naks[msg.reason.name] += 1
                log.info("%s refused: NAK %s", MsgType(msg.msg_type).name, msg.reason.name)
                return
            log.error("MCU rejected an automatic %s (%s)", MsgType(msg.msg_type).name, msg.reason.name)
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
        restoring = self._restoring
        if restoring:
            with self._tx_lock:  # identified: from here on the port may carry everything again
                self._restoring = False
        self._hello = msg
        if first or same_boot:
            self._boot_id = msg.boot_id
        else:
            self._on_new_boot(msg.boot_id)
        self._hello_seen.set()
        if restoring:
            self._restored(msg.boot_id)

    def _restored(self, boot_id: int) -> None:
        """The re-opened port has a live MCU again: tell the station, and whether the MCU reset meanwhile."""
        self._io_error = None
        self._reconnects += 1
        down_s = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        self._down_since = None
        mcu_reset = self._boot_at_loss is not None and boot_id != self._boot_at_loss
        log.warning("diverter link %s restored after %.2f s (reconnect %d); MCU %s", self.url, down_s,
                    self._reconnects, "reset meanwhile: queue lost, reconfigured" if mcu_reset else "ran on")
        self._emit(LinkRestoredEvent(self._clock(), self._reconnects, boot_id, mcu_reset, down_s))
        self._state.notify_all()

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
        self.mcu_clock.reset()  # its clock restarted
        self.belt_on_mcu_clock.reset()
        reconfigure = self._last_configure is not None
        if self._last_configure is not None:
            self._send(self._last_configure)
            self._reconfigure_due = time.monotonic() + CONFIGURE_RESEND_S  # until acked: it may be lost
        if self._estop_latched:
            # A boot comes up armed unless its input is pressed; the e-stop this host saw is not reset by a
            # power cycle: disarm the new boot until the operator's reset (rearm()).
            self._send(Arm(0))
            self._disarm_due = time.monotonic() + CONFIGURE_RESEND_S
        for cid in lost:
            self._finish(cid)
        log.warning(
            "diverter MCU reset (new boot_id %08x): %d queued commands lost %s; %s",
            boot_id, len(lost), list(lost), "re-sent Configure" if reconfigure else "not configured yet",
        )
        self._emit(ResetEvent(self._clock(), boot_id, lost, reconfigure))
        self._state.notify_all()
