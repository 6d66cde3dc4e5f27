"""A real Mosquitto and a real PostgreSQL, from Debian's packages, on loopback in temp dirs.

`make test` installs both (`apt-get install -y mosquitto postgresql`). Outside CI a developer
without them gets a skip that says so; in CI (env CI set) a missing binary is a failure.
PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user the Debian
package creates (or `nobody`).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

IN_CI = bool(os.environ.get("CI"))
REPO_ROOT = Path(__file__).resolve().parents[2]


def need(what: str, found: bool, hint: str) -> None:
    if found:
        return
    msg = f"{what} not found ({hint})"
    if IN_CI:
        pytest.fail(f"{msg}: CI must have it; `make test` installs it")
    pytest.skip(f"{msg}: run `make test`, or apt-get install -y mosquitto postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """One broker on a fixed port; `kill()` and `start()` again for an outage (state persisted)."""

    def __init__(self, root: Path):
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        need("mosquitto", exe is not None, "Debian package mosquitto")
        self.exe = exe
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        user = pwd.getpwuid(os.getuid()).pw_name
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.conf = root / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            f"user {user}\n"
            # docs/PLANT.md: sessions and queued messages survive a clean restart; a SIGKILL loses what
            # changed since the last autosave (here: everything, the tests kill it within seconds)
            "persistence true\n"
            f"persistence_location {root / 'data'}/\n"
            "persistence_file mosquitto.db\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 100\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\n")
        self.log = open(root / "mosquitto.log", "ab")

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 10, "mosquitto to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited: {(self.root / 'mosquitto.log').read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: the broker loses whatever it held only in memory."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class Postgres:
    def __init__(self):
        self.bin = _pg_bin()
        need("PostgreSQL server (initdb, pg_ctl)", self.bin is not None, "Debian package postgresql")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kozan-pg-"))
        self.data = self.dir / "data"
        self.run_as: list[str] = []
        if os.getuid() == 0:
            user = "postgres"
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                user, pw = "nobody", pwd.getpwnam("nobody")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.dir, 0o700)
            self.run_as = ["runuser", "-u", user, "--"]
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        r = subprocess.run(self.run_as + list(args), capture_output=True, text=True, timeout=300, cwd="/")
        if r.returncode:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {r.stdout[-1500:]} {r.stderr[-1500:]}")

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
                "-c shared_buffers=32MB -c max_connections=20")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "pg.log"), "-o", opts,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    m.start()
    yield m
    m.stop()


@pytest.fixture(scope="session")     # one initdb for the whole run: it is the slow part
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    pg.start()
    yield pg
    pg.stop()
