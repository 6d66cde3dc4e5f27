"""Gate inputs (PROTOCOL.md §6b) on both MCUs (Python simulator, C core) over the real pty and host link.

A light gate's edge is stamped by the MCU with the encoder count and its clock at the edge, reported as an
``InputEdge`` event only for inputs the host asked for (``GateSetup``), re-sent until acked and told to the
station once.
"""

from __future__ import annotations

import threading
import time

from firmware_bridge.events import InputEdgeEvent
from firmware_bridge.messages import MsgType

from .conftest import CCoreMcu, SimMcu


def _edge(mcu: SimMcu | CCoreMcu, inp: int, rising: bool) -> None:
    """The input changes level now (the world's current count and time), as the board's pin ISR sees it."""
    if isinstance(mcu, CCoreMcu):
        assert mcu.fw.command(f"edge {inp} {1 if rising else 0}") == "ok"
        return
    env = mcu.env
    if not hasattr(env, "pending_edges"):
        env.pending_edges = []
        env.edge_lock = threading.Lock()

        def input_edges() -> list[tuple[int, bool, int, int]]:
            with env.edge_lock:
                out, env.pending_edges = env.pending_edges, []
            return out

        env.input_edges = input_edges  # the optional McuEnvironment hook (simulator.py)
    with env.edge_lock:
        env.pending_edges.append((inp, rising, env.encoder_count(), env.mcu_time_us()))
    mcu.sync()


def _wait(pred, timeout: float = 2.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_gate_edge_is_stamped_resent_until_acked_and_told_once(ready) -> None:
    mcu, link, log = ready
    link.gate_setup([3])
    _edge(mcu, 4, True)  # not asked for: never reported
    mcu.drop_rx(MsgType.EVENT_ACK, 2)  # the host's first two acks are lost
    mcu.advance(37)  # count 57, MCU time 57 ms
    _edge(mcu, 3, True)
    ev = log.wait_for(lambda e: isinstance(e, InputEdgeEvent), timeout=2.0)
    assert (ev.input, ev.rising, ev.count, ev.mcu_time_us) == (3, True, 57, 57_000)
    for _ in range(2):  # re-sent after 50 ms, then 100 ms of MCU time (acks dropped)
        time.sleep(0.05)
        mcu.advance(100)
    _wait(lambda: link.health()["event_dups"] >= 2, what="two re-sent copies of InputEdge")
    _wait(lambda: mcu.events_pending == 0, what="the third ack to clear the MCU's event buffer")
    mcu.advance(23, dt_us=4_500)  # count 280, MCU time 261.5 ms
    _edge(mcu, 3, False)
    fall = log.wait_for(lambda e: isinstance(e, InputEdgeEvent) and not e.rising, timeout=2.0)
    assert (fall.input, fall.count, fall.mcu_time_us) == (3, 280, 261_500)
    mcu.advance(500)
    time.sleep(0.05)
    mcu.sync()
    edges = log.of_type(InputEdgeEvent)
    assert [(e.input, e.rising, e.count) for e in edges] == [(3, True, 57), (3, False, 280)], edges
    link.gate_setup([])  # reports off again
    _edge(mcu, 3, True)
    mcu.advance(10)
    time.sleep(0.05)
    mcu.sync()
    assert len(log.of_type(InputEdgeEvent)) == 2
