"""Who may do what on the HMI: operators need nothing, technicians a PIN, the network a token.

The PIN is short (a gloved hand types it on a touchscreen), so guessing is what must be made
slow: after `pin_max_failures` wrong PINs the entry locks for `pin_lockout_s`, doubling with each
further lockout until a right PIN is entered. The lock is global, not per client: the station has
one screen, and a guesser on the network must not get a fresh budget by changing address.

Every action that changes the line is appended to an audit log (JSON lines), with the role that did
it, so a technician's change to a rule can be found after a bad shift.

Run `python -m station.hmi.auth` to turn a PIN into the `hmi.pin_hash` value for station.yaml.
"""
from __future__ import annotations

import getpass
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

_ITERATIONS = 200_000


def hash_pin(pin: str, iterations: int = _ITERATIONS, salt: str | None = None) -> str:
    """pbkdf2_sha256$iterations$salt$hex: a stolen station.yaml does not give the PIN away cheaply."""
    salt = salt or secrets.token_hex(8)
    dk = hashlib.pbkdf2_hmac("sha256", pin.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${dk.hex()}"


def verify_pin_hash(pin: str, stored: str) -> bool:
    try:
        algo, it, salt, hexd = stored.split("$")
        if algo != "pbkdf2_sha256":
            return False
        dk = hashlib.pbkdf2_hmac("sha256", pin.encode(), salt.encode(), int(it))
    except ValueError:
        return False
    return hmac.compare_digest(dk.hex(), hexd)


class PinLocked(Exception):
    """Too many wrong PINs: the entry is locked for `retry_after_s`."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"too many wrong PINs: try again in {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class PinNotConfigured(Exception):
    """No PIN is set, so technician actions are off (safer than a default PIN)."""


class TechnicianAuth:
    """PIN check with lockout, and the short-lived technician sessions a right PIN opens."""

    def __init__(self, pin_hash: str, pin_env: str, max_failures: int, lockout_s: float, session_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self._pin_hash = pin_hash
        self._pin_env = pin_env
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self.session_s = session_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._lockouts = 0
        self._locked_until = 0.0
        self._sessions: dict[str, float] = {}

    def configured(self) -> bool:
        return bool(self._pin_hash or os.environ.get(self._pin_env))

    def _check(self, pin: str) -> bool:
        if self._pin_hash:
            return verify_pin_hash(pin, self._pin_hash)
        env = os.environ.get(self._pin_env, "")
        if not env:
            raise PinNotConfigured(f"no technician PIN is set: put hmi.pin_hash in station.yaml "
                                   f"(python -m station.hmi.auth) or set the environment variable {self._pin_env}")
        return hmac.compare_digest(pin.encode(), env.encode())

    def login(self, pin: str) -> str | None:
        """A session token for a right PIN, None for a wrong one; PinLocked while locked."""
        with self._lock:
            now = self._clock()
            if now < self._locked_until:
                raise PinLocked(self._locked_until - now)
            if not self._check(pin):
                self._failures += 1
                if self._failures >= self.max_failures:
                    self._locked_until = now + self.lockout_s * (2 ** self._lockouts)
                    self._lockouts += 1
                    self._failures = 0
                    log.warning("technician PIN locked for %.0f s after repeated wrong PINs",
                                self._locked_until - now)
                return None
            self._failures = 0
            self._lockouts = 0
            token = secrets.token_urlsafe(24)
            self._sessions = {k: v for k, v in self._sessions.items() if v > now}
            self._sessions[token] = now + self.session_s
            return token

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            exp = self._sessions.get(token)
            return exp is not None and exp > self._clock()

    def logout(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)

    def failures_left(self) -> int:
        with self._lock:
            return self.max_failures - self._failures


class AuditLog:
    """Append-only JSON lines: when, who (role), what, with which values, and whether it worked."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, role: str, action: str, ok: bool, client: str = "", **detail: Any) -> dict[str, Any]:
        entry = {"t": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "role": role, "action": action, "ok": ok,
                 "client": client, **detail}
        line = json.dumps(entry, ensure_ascii=False, default=str)
        with self._lock:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
        log.info("audit: %s", line)
        return entry

    def tail(self, n: int = 50) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self._lock:
            lines = self.path.read_text(encoding="utf-8").splitlines()[-n:]
        out = []
        for ln in lines:
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                continue
        return out


def main() -> None:
    """Print the hmi.pin_hash value for a PIN typed at the prompt."""
    pin = getpass.getpass("technician PIN: ")
    if len(pin) < 4 or not pin.isdigit():
        raise SystemExit("a PIN is at least 4 digits")
    if getpass.getpass("again: ") != pin:
        raise SystemExit("the two PINs differ")
    print(f"hmi:\n  pin_hash: \"{hash_pin(pin)}\"")  # noqa: T201 (a command-line tool's output)


if __name__ == "__main__":
    main()
