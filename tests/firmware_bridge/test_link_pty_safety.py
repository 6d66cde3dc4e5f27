"""A link must never write into a pseudo-terminal that is not its MCU's.

The hazard (seen on a shared machine): a link whose pty pair was torn down re-opened ``/dev/pts/N`` by path;
the kernel had given that number to another process's pty, which then received our protocol-v3 frames. So:

* ``close()`` stops the I/O thread and every re-open attempt at once; nothing opens or writes afterwards;
* a link opened directly on a pty slave never re-opens it (the pair never comes back under that number);
* through a symlink (a stable name, as udev gives a real device) it re-opens only once the symlink itself
  was replaced, never the lost pty the old symlink still names;
* on any re-opened port it sends only Identify, and acts on nothing, until a Hello of its own protocol
  version has identified the MCU: no heartbeat, retransmission, Configure or fire before that.

"Foreign" ptys here stand for another process's terminal; the kernel hands out the lowest free number, so
the first one opened after a pair is torn down usually takes that pair's number (the tests hold on to a few
so the old number is among them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import serial

from firmware_bridge import (
    DiverterLink,
    DiverterSetup,
    FirmwareSimulator,
    LinkError,
    LinkErrorEvent,
    LinkRestoredEvent,
    NakEvent,
)
from firmware_bridge.framing import FrameDecoder
from firmware_bridge.link import is_pty_slave
from firmware_bridge.messages import MsgType
from firmware_bridge.pseudo_terminal import close_pty_pair, open_pty_pair

from .conftest import EventLog, ManualEnvironment

DIVERTERS = [DiverterSetup(0, 0, 100)]


class OpenSpy:
    """Records every serial port the process opens (pyserial's serial_for_url) from now on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.urls: list[str] = []
        real = serial.serial_for_url

        def spy(url: str, *args: object, **kwargs: object) -> object:
            self.urls.append(str(url))
            return real(url, *args, **kwargs)

        monkeypatch.setattr(serial, "serial_for_url", spy)


def repoint(link_path: Path, target: str) -> None:
    tmp = link_path.with_name(link_path.name + ".new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link_path)


def foreign_ptys(want_path: str, tries: int = 8) -> list[tuple[int, str]]:
    """Open ptys as another process would (stopping at one that re-uses ``want_path``)."""
    out = []
    for _ in range(tries):
        out.append(open_pty_pair())
        if out[-1][1] == want_path:
            break
    return out


def received(master_fd: int, seconds: float) -> bytes:
    """Everything written to the slave side of ``master_fd`` within ``seconds``."""
    data = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master_fd, 4096)
        except BlockingIOError:
            chunk = b""
        except OSError:  # EIO: nobody has the slave open
            chunk = b""
        data += chunk
        if not chunk:
            time.sleep(0.01)
    return bytes(data)


def wait_until(pred, timeout: float = 2.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_pty_slave_detection(tmp_path: Path) -> None:
    master, path = open_pty_pair()
    try:
        assert is_pty_slave(path)
        link = tmp_path / "ttyKOZAN"
        os.symlink(path, link)
        assert is_pty_slave(str(link))
    finally:
        close_pty_pair(master)
    assert not is_pty_slave("loop://") and not is_pty_slave(str(tmp_path)) and not is_pty_slave("/dev/null")


def test_closed_link_never_reopens_its_path(manual_env: ManualEnvironment, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The link is closed while it is re-opening a lost port: no open, no byte, on that name afterwards."""
    sim = FirmwareSimulator.on_new_pty(manual_env)
    sim.start()
    port = tmp_path / "ttyKOZAN"
    repoint(port, str(sim.slave_path))
    link = DiverterLink(str(port), reconnect_initial_s=0.01, reconnect_max_s=0.02)
    foreign: list[tuple[int, str]] = []
    try:
        link.open(timeout=2.0)
        log = EventLog(link)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        sim.replug()  # the port is lost; the link starts re-opening with backoff
        assert log.wait_for(lambda e: isinstance(e, LinkErrorEvent)).reconnecting
        wait_until(lambda: link.health()["reconnect_attempts"] >= 2, what="re-open attempts")
        link.close()
        assert link._thread is None
        attempts = link.health()["reconnect_attempts"]
        spy = OpenSpy(monkeypatch)
        # The name now leads to a pty that is not the MCU's (another process's terminal).
        foreign = foreign_ptys("", tries=2)
        repoint(port, foreign[0][1])
        assert received(foreign[0][0], 0.5) == b""
        assert spy.urls == [] and link.health()["reconnect_attempts"] == attempts
    finally:
        link.close()
        sim.stop()
        for master, _ in foreign:
            close_pty_pair(master)


def test_a_pty_opened_by_path_is_never_reopened(manual_env: ManualEnvironment,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator (and its pty) goes away under an open link: the link says it is down for good and never
    opens that /dev/pts number again, whoever gets it next."""
    sim = FirmwareSimulator.on_new_pty(manual_env)
    sim.start()
    old_path = str(sim.slave_path)
    link = DiverterLink(old_path, reconnect_initial_s=0.01, reconnect_max_s=0.02)
    foreign: list[tuple[int, str]] = []
    try:
        link.open(timeout=2.0)
        log = EventLog(link)
        spy = OpenSpy(monkeypatch)
        sim.stop()
        lost = log.wait_for(lambda e: isinstance(e, LinkErrorEvent))
        assert not lost.reconnecting
        foreign = foreign_ptys(old_path)
        got = {path: received(master, 0.4) for master, path in foreign}
        assert all(data == b"" for data in got.values()), got
        assert spy.urls == [] and link.health()["reconnect_attempts"] == 0
        wait_until(lambda: link._thread is None or not link._thread.is_alive(), what="the I/O thread to end")
        with pytest.raises(LinkError, match="close\\(\\) and open\\(\\)"):
            link.fire_at(1, 0, 100, 10)
    finally:
        link.close()
        sim.stop()
        for master, _ in foreign:
            close_pty_pair(master)


def test_a_stale_symlink_to_a_lost_pty_is_not_followed(manual_env: ManualEnvironment, tmp_path: Path) -> None:
    """The stable name still points at the lost pty (whose number someone else may hold by now): the link
    waits; once the name is re-pointed at the MCU's new port it reconnects there."""
    sim = FirmwareSimulator.on_new_pty(manual_env)
    sim.start()
    old_path = str(sim.slave_path)
    port = tmp_path / "ttyKOZAN"
    repoint(port, old_path)
    link = DiverterLink(str(port), reconnect_initial_s=0.01, reconnect_max_s=0.02)
    foreign: list[tuple[int, str]] = []
    try:
        link.open(timeout=2.0)
        log = EventLog(link)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        new_path = sim.replug()
        assert log.wait_for(lambda e: isinstance(e, LinkErrorEvent)).reconnecting
        foreign = foreign_ptys(old_path)
        got = {path: received(master, 0.4) for master, path in foreign}
        assert all(data == b"" for data in got.values()), got
        assert link.health()["reconnect_attempts"] >= 2 and not link.connected
        repoint(port, new_path)
        restored = log.wait_for(lambda e: isinstance(e, LinkRestoredEvent), timeout=3.0)
        assert restored.boot_id == sim.boot_id and not restored.mcu_reset
        assert all(received(master, 0.05) == b"" for master, _ in foreign)
    finally:
        link.close()
        sim.stop()
        for master, _ in foreign:
            close_pty_pair(master)


def test_a_reopened_port_hears_only_identify_until_the_mcu_says_hello(manual_env: ManualEnvironment,
                                                                      tmp_path: Path) -> None:
    """A command waiting for the port, a Configure to re-send: none of it reaches a port before its Hello."""
    sim = FirmwareSimulator.on_new_pty(manual_env)
    sim.start()
    port = tmp_path / "ttyKOZAN"
    repoint(port, str(sim.slave_path))
    link = DiverterLink(str(port), reconnect_initial_s=0.01, reconnect_max_s=0.02)
    silent_master = None
    try:
        link.open(timeout=2.0)
        log = EventLog(link)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        sim.replug()
        log.wait_for(lambda e: isinstance(e, LinkErrorEvent))
        link.fire_at(1, 0, belt_count=10_000, pulse_ms=10)  # waits for the port
        with pytest.raises(LinkError, match="fire-now refused"):
            link.fire_now(2, 0, pulse_ms=10)  # "now" must not mean "whenever the cable is back"
        silent_master, silent_path = open_pty_pair()  # something that is not our MCU, and never answers
        repoint(port, silent_path)
        data = received(silent_master, 0.6)
        frames = FrameDecoder().feed(data)
        assert frames, "the link never asked who is there"
        assert {f.msg_type for f in frames} == {MsgType.IDENTIFY}, [MsgType(f.msg_type).name for f in frames]
        assert not link.connected and link.health()["pending"] == 1
    finally:
        link.close()
        sim.stop()
        if silent_master is not None:
            close_pty_pair(silent_master)


def test_a_refused_request_is_an_error_not_a_command_event(manual_env: ManualEnvironment) -> None:
    """rearm() while the e-stop is pressed raises; it does not also read as "MCU refused command 0"."""
    with FirmwareSimulator.on_new_pty(manual_env) as sim, DiverterLink(str(sim.slave_path)) as link:
        log = EventLog(link)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        sim.set_estop(True)
        wait_until(lambda: link.estop_latched, what="the e-stop to reach the link")
        with pytest.raises(LinkError, match="still pressed"):
            link.rearm()
        assert link.health()["naks"].get("ESTOP", 0) >= 1
        assert not log.of_type(NakEvent)
