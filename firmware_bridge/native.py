"""The reference firmware's C core, built for Linux and run on a pseudo-terminal (``firmware/host_main.c``).

Why: the conformance suite and the fault campaign must vouch for the code that is flashed, not only for
the Python simulator. The host build runs the very same ``kozan_mcu.c`` behind a pty, and its control
channel (the process's stdin/stdout) lets a test move the belt and the MCU clock deterministically and
read every output switch back, just like ``ManualEnvironment`` does for the simulator.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FIRMWARE_DIR = Path(__file__).resolve().parent / "firmware"
SOURCES = ("host_main.c", "kozan_mcu.c")
CFLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-O2")


class NativeFirmwareError(RuntimeError):
    """The host build could not be compiled, started, or stopped answering its control channel."""


def build_host_firmware(out_dir: Path, cc: str | None = None) -> Path:
    """Compile ``kozan_mcu_host`` into ``out_dir`` with the project's strict flags; returns the binary.

    Raises :class:`NativeFirmwareError` naming the compiler output when the build fails.
    """
    compiler = cc or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise NativeFirmwareError("no C compiler found (install gcc, or set CC) to build the host firmware")
    out_dir.mkdir(parents=True, exist_ok=True)
    binary = out_dir / "kozan_mcu_host"
    cmd = [compiler, *CFLAGS, "-o", str(binary), *(str(FIRMWARE_DIR / s) for s in SOURCES)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NativeFirmwareError(
            f"building the host firmware failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}"
            "Fix the C sources in firmware_bridge/firmware/ so they build warning-free."
        )
    return binary


@dataclass(frozen=True)
class OutputSwitch:
    """One output switching, as the host build reports it (ground truth for tests)."""

    on: bool
    diverter: int
    on_count: int  # the commanded count at which it switched on (0 for an off)
    pulse_ms: int
    command_id: int
    mcu_time_us: int
    count_now: int  # the encoder count when it switched
    host_time_s: float = 0.0  # time.monotonic() when the line reached this process (for benches)


class NativeFirmware:
    """Runs ``kozan_mcu_host`` on its own new pty; ``slave_path`` is the port for the host link.

    ``counts_per_s`` set: a real-time constant-speed belt (for benches and real-time watchdog checks);
    None: a manual world moved only by :meth:`set_world`.
    """

    def __init__(self, binary: Path, *, counts_per_s: float | None = None, seed: int | None = None) -> None:
        self.binary = Path(binary)
        self.counts_per_s = counts_per_s
        self.seed = seed
        self.slave_path: str | None = None
        self.switches: list[OutputSwitch] = []
        self.belt_switches: list[tuple[bool, int, int]] = []  # (run, mcu_time_us, count_now) per change
        self._switch_lock = threading.Lock()
        self._replies: queue.Queue[str] = queue.Queue()
        self._ctl_lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 5.0) -> None:
        if self._proc is not None:
            raise NativeFirmwareError("NativeFirmware already started; create a new one to restart")
        cmd = [str(self.binary)]
        if self.counts_per_s is not None:
            cmd += ["--speed", repr(float(self.counts_per_s))]
        if self.seed is not None:
            cmd += ["--seed", str(self.seed)]
        try:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
            )
        except OSError as exc:
            raise NativeFirmwareError(f"cannot start {self.binary}: {exc}; build it with build_host_firmware()") from exc
        self._reader = threading.Thread(target=self._read_stdout, name="native-mcu-stdout", daemon=True)
        self._reader.start()
        first = self._reply(timeout)
        if not first.startswith("pty "):
            self.stop()
            raise NativeFirmwareError(f"{self.binary} did not announce its pty (got {first!r})")
        self.slave_path = first.split(" ", 1)[1]

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
                proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            log.error("kozan_mcu_host pid %d ignored quit; killing it", proc.pid)
            proc.kill()
            proc.wait(2.0)
        if self._reader is not None:
            self._reader.join(2.0)
        self._proc = None

    def __enter__(self) -> NativeFirmware:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- control channel
    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.monotonic()
            line = line.rstrip("\n")
            if line.startswith("act belt "):
                parts = line.split()
                with self._switch_lock:
                    self.belt_switches.append((parts[2] == "1", int(parts[3]), int(parts[4])))
            elif line.startswith("act "):
                parts = line.split()
                if parts[1] == "on":
                    sw = OutputSwitch(True, int(parts[2]), int(parts[3]), int(parts[4]), int(parts[5]),
                                      int(parts[6]), int(parts[7]), now)
                else:
                    sw = OutputSwitch(False, int(parts[2]), 0, 0, 0, int(parts[3]), int(parts[4]), now)
                with self._switch_lock:
                    self.switches.append(sw)
            else:
                self._replies.put(line)
        self._replies.put("eof")

    def _reply(self, timeout: float) -> str:
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            raise NativeFirmwareError(f"kozan_mcu_host did not answer within {timeout} s (hung or crashed?)") from None

    def command(self, line: str, timeout: float = 2.0) -> str:
        """Send one control line and return its reply; raises on ``err`` replies or a dead process."""
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise NativeFirmwareError("kozan_mcu_host is not running; call start() first")
        with self._ctl_lock:
            try:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError) as exc:
                raise NativeFirmwareError(f"kozan_mcu_host exited (code {proc.poll()}): {exc}") from exc
            reply = self._reply(timeout)
        if reply.startswith("err") or reply == "eof":
            raise NativeFirmwareError(f"control line {line!r} failed: {reply}")
        return reply

    def set_world(self, count: int, time_us: int) -> None:
        """Manual world: move the belt to ``count`` and the MCU clock to ``time_us``, then run one pass."""
        self.command(f"set {int(count)} {int(time_us)}")

    def sync(self) -> None:
        """Run one whole service pass now (reads what the host sent, fires what is due)."""
        self.command("sync")

    def set_estop(self, active: bool) -> None:
        self.command(f"estop {1 if active else 0}")

    def reset(self) -> None:
        """Power-cycle the MCU core: queue and configuration lost, new boot id, Hello sent."""
        self.command("reset")

    def drop_rx(self, msg_type: int, count: int = 1) -> None:
        self.command(f"drop {int(msg_type)} {int(count)}")

    def replug(self) -> str:
        """The cable is pulled and re-plugged: the core runs on (no reset), its port moves to a new pty and
        the old one closes. Returns (and remembers) the new slave path."""
        reply = self.command("replug")
        self.slave_path = reply.split(" ", 1)[1]
        return self.slave_path

    @property
    def belt_running(self) -> bool:
        with self._switch_lock:
            return bool(self.belt_switches) and self.belt_switches[-1][0]

    def state(self) -> dict[str, int]:
        reply = self.command("state")
        return {k: int(v) for k, v in (kv.split("=") for kv in reply.split()[1:])}

    def fired(self) -> list[OutputSwitch]:
        """The on-switches so far (each is one fired command).

        The core writes a switch to its control stdout (buffered) and the Fired event to the pty (at
        once), so a caller that has seen the event may ask before the reader thread has the line. A
        running core is asked for its state first: the reply comes after every line already written,
        and the reader records lines in order.
        """
        if self._proc is not None:
            self.state()
        with self._switch_lock:
            return [s for s in self.switches if s.on]
