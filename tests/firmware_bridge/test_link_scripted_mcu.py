"""Answer sequences that neither MCU (the Python simulator, the C core) can be told to produce.

The fault campaign loses frames at random, so a sequence that needs one particular answer lost
shows up there once in many runs and cannot be replayed. Here a scripted MCU on a real pty
answers exactly what the test says, frame by frame, and the host link under test is the real one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from firmware_bridge import AckEvent, DiverterLink, ResetEvent
from firmware_bridge.framing import FrameDecoder
from firmware_bridge.messages import (
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    FireAt,
    Hello,
    Identify,
    Message,
    MsgType,
    decode_message,
    encode_message,
)
from firmware_bridge.pseudo_terminal import close_pty_pair, open_pty_pair

from .conftest import EventLog

Script = Callable[["ScriptedMcu", Message, int], None]


class ScriptedMcu:
    """The MCU end of a pty: records every host message and answers only what `script` says.

    It answers Identify with a Hello of its current boot by itself, so a link can open; all else
    (Acks, events) is the script's. Heartbeats are recorded and never answered, as a real MCU's
    are not.
    """

    def __init__(self, script: Script, boot_id: int = 0x0B007001) -> None:
        self.master, self.path = open_pty_pair()
        self.script = script
        self.boot_id = boot_id
        self.received: list[tuple[Message, int]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-mcu", daemon=True)
        self._thread.start()

    def send(self, msg: Message) -> None:
        with self._lock:
            data = encode_message(msg, self._seq)
            self._seq = (self._seq + 1) & 0xFF
        os.write(self.master, data)

    def hello(self) -> None:
        self.send(Hello(self.boot_id, 0x0100, PROTOCOL_VERSION, 0))

    def of_type(self, cls: type) -> list[tuple[Message, int]]:
        with self._lock:
            return [(m, s) for m, s in self.received if isinstance(m, cls)]

    def _run(self) -> None:
        decoder = FrameDecoder()
        while not self._stop.is_set():
            try:
                data = os.read(self.master, 4096)
            except (BlockingIOError, OSError):
                time.sleep(0.002)
                continue
            for frame in decoder.feed(data):
                msg = decode_message(frame)
                with self._lock:
                    self.received.append((msg, frame.seq))
                if isinstance(msg, Identify):
                    self.hello()
                else:
                    self.script(self, msg, frame.seq)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        close_pty_pair(self.master)


def wait_until(pred: Callable[[], bool], timeout: float = 2.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], ScriptedMcu]]:
    made: list[ScriptedMcu] = []

    def make(script: Script) -> ScriptedMcu:
        made.append(ScriptedMcu(script))
        return made[-1]

    yield make
    for mcu in made:
        mcu.close()


def test_a_cancel_ack_settles_a_fire_whose_own_ack_was_lost(scripted: Callable[[Script], ScriptedMcu]) -> None:
    """FireAt's Ack lost, Cancel acked, the Ended(CANCELLED) that follows lost, then the MCU resets.

    The command has one outcome, "cancelled". Before the fix the FireAt stayed pending: it was
    re-sent after its Cancel (a queued fire the host had just called off), and the reset listed it
    among the commands lost: a second final outcome for one item.
    """
    def script(mcu: ScriptedMcu, msg: Message, seq: int) -> None:
        if isinstance(msg, Cancel):     # the FireAt arrived (the MCU has it queued); only its Ack is lost
            mcu.send(Ack(seq, int(MsgType.CANCEL), msg.command_id))

    mcu = scripted(script)
    retransmit_s = 0.3
    link = DiverterLink(mcu.path, retransmit_timeout_s=retransmit_s, max_retries=10)
    try:
        link.open(timeout=2.0)
        log = EventLog(link)
        link.fire_at(1, 0, belt_count=100_000, pulse_ms=20)
        wait_until(lambda: mcu.of_type(FireAt), what="the FireAt to reach the MCU")
        link.cancel(1)
        cancelled = log.wait_for(lambda e: isinstance(e, AckEvent) and e.command_id == 1)
        assert cancelled.msg_type == MsgType.CANCEL
        assert len(mcu.of_type(FireAt)) == 1, "re-sent before its Cancel was answered: the test's timing is off"
        time.sleep(4 * retransmit_s)   # a command still pending would be re-sent in this time
        assert len(mcu.of_type(FireAt)) == 1, "a cancelled FireAt was sent again"
        assert link.health()["pending"] == 0
        mcu.boot_id += 1
        mcu.hello()                    # the MCU reset before re-sending its Ended(CANCELLED)
        reset = log.wait_for(lambda e: isinstance(e, ResetEvent))
        assert reset.lost_command_ids == (), "a cancelled command was also reported lost in the reset"
        outcomes = [e for e in log.drain() if getattr(e, "command_id", None) == 1]
        assert outcomes == [cancelled]
    finally:
        link.close()
