"""Fault campaign: a byte-level proxy between the host link and each MCU implementation injects line faults.

Topology (all real pseudo-terminals)::

    DiverterLink ── pty B ── FaultProxy ── pty A ── MCU (Python simulator | C core host build)

The proxy corrupts the byte stream in both directions (garbage inserted, bits flipped, bytes dropped,
duplicated and delayed) and blacks the line out (cable pulled); the driver re-opens the host port
(``DiverterLink.reopen``), pulls the host's cable and plugs it back under the same stable name (the link
re-opens it by itself, with backoff), power-cycles the MCU and presses its e-stop mid-run (released later;
firing then needs the link's explicit re-arm, which the driver sends as the operator's reset). Hypothesis
draws the mix.
The belt runs at 1000 counts/s in a manual world stepped in lockstep with wall time, so the MCU's watchdog
sees realistic silences.

What must hold is counted, then asserted, from the world's actuation log (ground truth), never from what
the host believes:
  * no wrong fire: every actuation belongs to a command the host sent, on its diverter, at its
    latency-compensated count, with its pulse;
  * no duplicate fire: a command id actuates at most once;
  * no late fire: an output switches on in the first service pass at or after its on_count, and a command
    whose count had already passed when it was sent never fires;
  * every command's final outcome reaches the host, exactly once, and is true: Fired (at the count the
    world saw), a Nak or an MCU cancellation (never fired), the Cancel acked (never fired), or lost in an
    MCU reset (never fires after it); a timeout is only ever an interim report. Nothing is left queued;
  * the station is told of every fault: every Fault the MCU raised reaches the host exactly once (a reset
    takes its unacknowledged ones with it, and the reset itself is told); every lost port is told
    (``LinkErrorEvent``) and so is every recovery (``LinkRestoredEvent``), with no manual re-open.

Fault and outcome counts are summed per implementation and written as JSON to $KOZAN_FAULT_REPORT;
$KOZAN_FAULT_EXAMPLES (default 8) sets the examples per implementation for a longer soak.
Residual risk, by design: a corrupted frame passes CRC-16 with probability ~2^-16, so in a long enough
campaign a corrupted FireAt could be accepted. Flips are rare enough here that this is ~1e-3 per run.
"""

from __future__ import annotations

import json
import os
import random
import select
import tempfile
import threading
import time
import tty
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from firmware_bridge import (
    AckEvent,
    CommandTimeoutEvent,
    DiverterLink,
    DiverterSetup,
    FaultEvent,
    FiredEvent,
    LinkErrorEvent,
    LinkRestoredEvent,
    NakEvent,
    NakReason,
    ResetEvent,
)
from firmware_bridge.messages import MsgType
from firmware_bridge.pseudo_terminal import close_pty_pair, open_pty_pair

STEP_COUNTS = 5  # belt counts per driver step
STEP_US = 5_000  # = 1000 counts/s
RUN_STEPS = 160  # ~0.8 s of faulty line per example
LATENCY_COUNTS = {0: 20, 1: 0}  # at 1000 counts/s
DIVERTERS = [DiverterSetup(0, 20_000, 100), DiverterSetup(1, 0, 50)]
FAULT_KINDS = ("garbage", "flip", "drop", "dup", "delay")
RATES = [0.0, 0.0005, 0.002, 0.01]
OUTBOX_LIMIT = 64 * 1024

#: Examples per implementation. The default keeps the whole campaign near 30 s; raise it for a soak.
EXAMPLES = int(os.environ.get("KOZAN_FAULT_EXAMPLES", "8"))

REPORT: dict[str, Counter[str]] = {}
CLEAN_LINE: dict[str, Any] = {
    "seed": 0,
    "rates": {k: 0.0 for k in FAULT_KINDS},
    "commands": [(i % 2, 15 + 10 * i, 10, i % 5 == 4) for i in range(20)],
    "events": [],
}


# ------------------------------------------------------------------------------------------ the proxy
class FaultProxy:
    """Copies bytes between the MCU's pty and a new pty for the host, injecting faults on the way.

    Order is preserved in each direction (a serial line never reorders); a delay holds back the byte and
    everything after it. All randomness comes from one seeded ``random.Random``, so the fault pattern for
    a given byte sequence is reproducible.
    """

    def __init__(self, mcu_slave_path: str, rng: random.Random, rates: dict[str, float], counts: Counter[str]) -> None:
        self.mcu_fd = os.open(mcu_slave_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.mcu_fd)
        self.host_master, self.slave_path = open_pty_pair()
        # The stable name the host opens (a udev symlink, /dev/serial/by-id/...), so a re-plugged cable can
        # come back on a new pty and the host still finds it.
        self._dir = tempfile.mkdtemp(prefix="kozan-proxy-")
        self.port = str(Path(self._dir) / "ttyKOZAN")
        os.symlink(self.slave_path, self.port)
        self._replug: float | None = None  # gap (s) of a requested replug, applied by the proxy thread
        self._repoint_at: float | None = None
        self._new_path = ""
        self.rng = rng
        self.rates = dict(rates)
        self.counts = counts
        self._lock = threading.Lock()
        self._blackout_until = 0.0
        self.mute_to_host = False  # drop everything the MCU says (its answers are lost), keep the other way
        # direction -> list of [release_time, bytearray]
        self._outbox: dict[str, list[list[Any]]] = {"to_mcu": [], "to_host": []}
        self._release: dict[str, float] = {"to_mcu": 0.0, "to_host": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    def set_rates(self, rates: dict[str, float]) -> None:
        with self._lock:
            self.rates = dict(rates)

    def blackout(self, seconds: float) -> None:
        """Drop every byte both ways for ``seconds`` (a pulled cable)."""
        with self._lock:
            self._blackout_until = time.monotonic() + seconds
        self.counts["fault_disconnect"] += 1

    def replug(self, gap_s: float) -> None:
        """Pull the host's cable and plug it back ``gap_s`` later: the host's pty closes at once (its reads
        fail), a new one appears under the same stable name after the gap. The MCU runs on."""
        with self._lock:
            self._replug = gap_s
        self.counts["fault_replug"] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        os.close(self.mcu_fd)
        close_pty_pair(self.host_master)
        for name in (self.port, self.port + ".new"):
            try:
                os.unlink(name)
            except OSError:
                pass
        os.rmdir(self._dir)

    def _apply_replug(self, now: float) -> None:
        with self._lock:
            gap, self._replug = self._replug, None
        if gap is not None:
            old = self.host_master
            self.host_master, self._new_path = open_pty_pair()
            close_pty_pair(old)
            self._outbox["to_host"].clear()  # bytes on the pulled cable are gone
            self._repoint_at = now + gap
        if self._repoint_at is not None and now >= self._repoint_at:
            os.symlink(self._new_path, self.port + ".new")
            os.replace(self.port + ".new", self.port)
            self._repoint_at = None

    def _inject(self, direction: str, data: bytes, now: float) -> None:
        with self._lock:
            rates = self.rates
            dark = now < self._blackout_until
        if dark or (direction == "to_host" and self.mute_to_host):
            self.counts["bytes_blacked_out"] += len(data)
            return
        out = bytearray()
        box = self._outbox[direction]
        release = max(self._release[direction], now)
        for b in data:
            r = self.rng.random()
            if r < rates["drop"]:
                self.counts[f"fault_drop_{direction}"] += 1
                continue
            r -= rates["drop"]
            if r < rates["flip"]:
                b ^= 1 << self.rng.randrange(8)
                self.counts[f"fault_flip_{direction}"] += 1
            elif r - rates["flip"] < rates["garbage"]:
                out += bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 6)))
                self.counts[f"fault_garbage_{direction}"] += 1
            elif r - rates["flip"] - rates["garbage"] < rates["dup"]:
                out.append(b)
                self.counts[f"fault_dup_{direction}"] += 1
            elif r - rates["flip"] - rates["garbage"] - rates["dup"] < rates["delay"]:
                if out:
                    box.append([release, out])
                    out = bytearray()
                release = max(release, now + self.rng.uniform(0.005, 0.08))
                self.counts[f"fault_delay_{direction}"] += 1
            out.append(b)
        if out:
            box.append([release, out])
        self._release[direction] = release

    def _flush(self, direction: str, fd: int, now: float) -> None:
        box = self._outbox[direction]
        while box and box[0][0] <= now:
            data = box[0][1]
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:  # nobody on the other end right now: the bytes are lost, as on a real line
                n = len(data)
                self.counts["bytes_lost_no_reader"] += n
            del data[:n]
            if data:
                if sum(len(c[1]) for c in box) > OUTBOX_LIMIT:
                    self.counts["bytes_lost_overflow"] += sum(len(c[1]) for c in box)
                    box.clear()
                return
            box.pop(0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_replug(time.monotonic())
            fds = {self.mcu_fd: "to_host", self.host_master: "to_mcu"}
            try:
                ready, _, _ = select.select(list(fds), [], [], 0.001)
            except (OSError, ValueError):
                return
            now = time.monotonic()
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except (BlockingIOError, OSError):
                    continue
                if data:
                    self._inject(fds[fd], data, now)
            self._flush("to_mcu", self.mcu_fd, now)
            self._flush("to_host", self.host_master, now)


# ------------------------------------------------------------------------------------------ the driver
@dataclass
class Sent:
    command_id: int
    diverter: int
    belt_count: int
    pulse_ms: int
    count_at_send: int


@dataclass
class Story:
    """Everything the host was told about one command."""

    events: list[Any] = field(default_factory=list)


def scenario() -> st.SearchStrategy[dict[str, Any]]:
    command = st.tuples(
        st.integers(0, 1),  # diverter
        st.integers(-30, 250),  # counts ahead of the belt when sent
        st.integers(1, 40),  # pulse_ms
        st.booleans(),  # cancel it a little later
    )
    event = st.tuples(st.integers(5, RUN_STEPS - 5),
                      st.sampled_from(["reset", "blackout", "reconnect", "replug", "estop"]),
                      st.floats(0.02, 0.4))
    return st.fixed_dictionaries({
        "seed": st.integers(0, 2**32 - 1),
        "rates": st.fixed_dictionaries({k: st.sampled_from(RATES) for k in FAULT_KINDS}),
        "commands": st.lists(command, min_size=4, max_size=24),
        "events": st.lists(event, max_size=3),
    })


def mcu_estop_pressed(mcu: Any) -> bool:
    if hasattr(mcu, "sim"):
        mcu.sync()
        return bool(mcu.sim._estop)
    return bool(mcu.fw.state()["estop"])


def mcu_faults(mcu: Any) -> int:
    """Faults the MCU raised (ground truth, summed over its boots)."""
    if hasattr(mcu, "sim"):
        return int(mcu.sim.stats["faults"])
    return int(mcu.fw.state()["faults"])


def run_campaign(mcu: Any, plan: dict[str, Any], counts: Counter[str]) -> None:
    rng = random.Random(plan["seed"])
    proxy = FaultProxy(mcu.slave_path, rng, {k: 0.0 for k in FAULT_KINDS}, counts)
    stories: dict[int, Story] = {}
    sent: dict[int, Sent] = {}
    faults_told: list[FaultEvent] = []
    resets_told: list[ResetEvent] = []
    links_lost: list[LinkErrorEvent] = []
    links_restored: list[LinkRestoredEvent] = []
    reset_counts: list[int] = []  # belt count at each MCU reset
    replugs = 0
    link = DiverterLink(proxy.port, reconnect_initial_s=0.02, reconnect_max_s=0.1)
    try:
        link.open(timeout=3.0)
        link.configure(0.5, DIVERTERS, watchdog_ms=250, timeout=3.0)
        mcu.advance(STEP_COUNTS, STEP_US)
        mcu.advance(STEP_COUNTS, STEP_US)
        faults_before = mcu_faults(mcu)
        proxy.set_rates(plan["rates"])
        for kind, rate in plan["rates"].items():
            counts[f"rate_{kind}_{rate}"] += 1

        def drain() -> None:
            for ev in link.poll_events():
                cid = getattr(ev, "command_id", None)
                if isinstance(ev, ResetEvent):
                    resets_told.append(ev)
                    for lost in ev.lost_command_ids:
                        stories.setdefault(lost, Story()).events.append(ev)
                elif isinstance(ev, FaultEvent):
                    faults_told.append(ev)
                    counts[f"host_told_fault_{ev.code.name}"] += 1
                elif isinstance(ev, LinkErrorEvent):
                    links_lost.append(ev)
                elif isinstance(ev, LinkRestoredEvent):
                    links_restored.append(ev)
                elif cid is not None and cid in sent:
                    stories.setdefault(cid, Story()).events.append(ev)

        commands = list(plan["commands"])
        send_at = {int(i * (RUN_STEPS - 40) / len(commands)) + 2: c for i, c in enumerate(commands)}
        events: dict[int, tuple[str, float]] = {step: (kind, arg) for step, kind, arg in plan["events"]}
        cancels: dict[int, int] = {}
        estop_release: set[int] = set()
        next_id = 1
        t_next = time.monotonic()
        for step in range(RUN_STEPS):
            if step in send_at:
                diverter, ahead, pulse, cancel = send_at[step]
                cid = next_id
                next_id += 1
                sent[cid] = Sent(cid, diverter, mcu.count + ahead, pulse, mcu.count)
                link.fire_at(cid, diverter, mcu.count + ahead, pulse)
                if cancel:
                    cancels[step + 8] = cid
            if step in cancels:
                link.cancel(cancels[step])
                counts["cancels_sent"] += 1
            if step in estop_release:
                mcu.set_estop(False)
                link.rearm(timeout=3.0)  # the operator's reset: the explicit re-arm (PROTOCOL.md §6)
            if step in events:
                kind, arg = events[step]
                if kind == "reset":
                    reset_counts.append(mcu.count)
                    mcu.reset()
                    counts["fault_mcu_reset"] += 1
                elif kind == "blackout":
                    proxy.blackout(arg)
                elif kind == "estop":  # pressed for `arg` seconds of belt time
                    counts["fault_estop"] += 1
                    mcu.set_estop(True)
                    estop_release.add(min(RUN_STEPS - 1, step + max(1, int(arg * 1e6 / STEP_US))))
                elif kind == "replug":  # the cable: the link must find the port again by itself
                    replugs += 1
                    proxy.replug(arg)
                else:  # close the host port and open it again, as after a USB re-enumeration
                    counts["fault_port_reconnect"] += 1
                    drain()
                    time.sleep(min(arg, 0.1))
                    deadline = time.monotonic() + 3.0
                    while not link.connected:  # a replug still being recovered from: let it finish
                        assert time.monotonic() < deadline, f"link not restored: {link.health()}"
                        time.sleep(0.01)
                    link.reopen(timeout=3.0)
            mcu.advance(STEP_COUNTS, STEP_US)
            drain()
            t_next += STEP_US / 1e6
            delay = t_next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                t_next = time.monotonic()
        if mcu_estop_pressed(mcu):
            mcu.set_estop(False)
            link.rearm(timeout=3.0)

        # Settle on a clean line: every command's count passes, every answer and event arrives.
        proxy.set_rates({k: 0.0 for k in FAULT_KINDS})
        proxy.blackout(0.0)
        counts["fault_disconnect"] -= 1  # the call above only ends a blackout
        time.sleep(0.1)
        for _ in range(70):
            mcu.advance(STEP_COUNTS, STEP_US)
            time.sleep(0.004)
        deadline = time.monotonic() + 5.0
        while not link.wait_resolved(0.05):  # keep the MCU clock moving: events are re-sent on it
            assert time.monotonic() < deadline, f"commands without a final outcome: {link.health()}"
            mcu.advance(STEP_COUNTS, STEP_US)
        while mcu.events_pending:  # every event the MCU raised has been acked by the host
            assert time.monotonic() < deadline, f"{mcu.events_pending} MCU events never acked: {link.health()}"
            mcu.advance(STEP_COUNTS, 20_000)  # events are re-sent on the MCU clock
            time.sleep(0.01)
        time.sleep(0.05)
        drain()
        final_queue = mcu.queue_depth
        faults_raised = mcu_faults(mcu) - faults_before
        health = link.health()
    finally:
        link.close()
        proxy.stop()

    counts["mcu_faults_raised"] += faults_raised
    counts["link_retries"] += health["retries"]
    counts["link_timeouts"] += health["timeouts"]
    counts["link_resolved_after_timeout"] += health["resolved_after_timeout"]
    counts["link_event_dups"] += health["event_dups"]
    counts["link_resyncs"] += health["resyncs"]
    clean = not plan["events"] and not any(plan["rates"].values())
    judge(mcu.shots(), sent, stories, final_queue, reset_counts, counts, clean)
    # The station is told of every fault: each MCU fault exactly once (a reset takes unacked ones with it,
    # and the reset itself is told), and of every reset.
    assert len(faults_told) <= faults_raised, f"told {len(faults_told)} faults, the MCU raised {faults_raised}"
    if not reset_counts:
        assert len(faults_told) == faults_raised, (
            f"the MCU raised {faults_raised} faults, the host was told of {len(faults_told)}: {faults_told}")
    else:
        assert 1 <= len(resets_told) <= len(reset_counts), f"{len(reset_counts)} resets, told {resets_told}"
    counts["host_told_resets"] += len(resets_told)
    # Every lost port is told, and every loss is followed by its recovery, without a manual re-open.
    assert len(links_lost) <= replugs and (replugs == 0 or links_lost), (replugs, links_lost)
    assert len(links_restored) == len(links_lost), (links_lost, links_restored)
    assert health["reconnects"] == len(links_restored) and health["connected"]
    counts["host_told_link_lost"] += len(links_lost)
    counts["host_told_link_restored"] += len(links_restored)


def judge(shots: list[Any], sent: dict[int, Sent], stories: dict[int, Story], final_queue: int,
          reset_counts: list[int], counts: Counter[str], clean: bool) -> None:
    """The ground-truth properties (module docstring), counted first and then asserted."""
    problems: dict[str, list[str]] = {"wrong_fire": [], "duplicate_fire": [], "late_fire": [],
                                      "outcome_unknown": [], "outcome_wrong": []}
    fired_ids = Counter(s.command_id for s in shots)
    for cid, n in fired_ids.items():
        if n > 1:
            problems["duplicate_fire"].append(f"command {cid} fired {n} times")
    for shot in shots:
        cmd = sent.get(shot.command_id)
        if cmd is None:
            problems["wrong_fire"].append(f"phantom fire of a command the host never sent: {shot}")
            continue
        allowed = {cmd.belt_count - LATENCY_COUNTS[cmd.diverter]}
        if reset_counts:  # right after a reset the MCU has no speed yet: no compensation (PROTOCOL.md §5)
            allowed.add(cmd.belt_count)
        if shot.diverter != cmd.diverter or shot.on_count not in allowed or shot.pulse_ms != cmd.pulse_ms:
            problems["wrong_fire"].append(f"{shot} for {cmd} (allowed counts {allowed})")
        if shot.on_count <= cmd.count_at_send or not 0 <= shot.count_when_called - shot.on_count < STEP_COUNTS:
            problems["late_fire"].append(f"{shot} for {cmd}")

    by_id = {s.command_id: s for s in shots}
    for cid, cmd in sent.items():
        evs = stories.get(cid, Story()).events
        finals = []
        for e in evs:
            if isinstance(e, FiredEvent):
                finals.append("fired")
            elif isinstance(e, NakEvent) and e.msg_type == MsgType.FIRE_AT:
                finals.append(f"nak_{e.reason.name}")
            elif isinstance(e, AckEvent) and e.msg_type == MsgType.CANCEL:
                finals.append("cancelled")
            elif isinstance(e, ResetEvent):
                finals.append("lost_in_reset")
        shot = by_id.get(cid)
        timed_out = any(isinstance(e, CommandTimeoutEvent) for e in evs)
        if len(finals) != 1:
            problems["outcome_unknown" if not finals else "outcome_wrong"].append(
                f"command {cid} ({cmd}): final outcomes {finals}, events {evs}")
            continue
        final = finals[0]
        counts[f"outcome_{final}"] += 1
        if timed_out:
            counts["timed_out_then_" + ("fired" if final == "fired" else "ended")] += 1
        if final == "fired":
            fe = next(e for e in evs if isinstance(e, FiredEvent))
            if shot is None or fe.actual_count != shot.on_count:
                problems["outcome_wrong"].append(f"host told Fired for {cid} at {fe.actual_count}, world saw {shot}")
        elif final == "lost_in_reset":
            # "lost" = will not fire from now on; it may have fired before the reset (its Fired unacked)
            if shot is not None:
                counts["lost_in_reset_had_fired_before"] += 1
                if shot.count_when_called > max(reset_counts):
                    problems["outcome_wrong"].append(f"{cid} reported lost in a reset but fired after it: {shot}")
        elif shot is not None:
            problems["outcome_wrong"].append(f"command {cid} ended ({final}) but fired: {shot}")
        if cmd.belt_count <= cmd.count_at_send and shot is not None:
            problems["late_fire"].append(f"command {cid} sent after its count passed, yet fired: {shot}")
        if clean:  # no fault at all: nothing times out, nothing is lost
            assert not timed_out and final != "lost_in_reset", f"clean line: {cid}: {evs}"
    counts["commands"] += len(sent)
    for name, found in problems.items():
        counts[name] += len(found)
    assert final_queue == 0, f"{final_queue} command(s) still queued on the MCU after every count passed"
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}


def write_report() -> None:
    path = os.environ.get("KOZAN_FAULT_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({k: dict(sorted(v.items())) for k, v in REPORT.items()}, fh, indent=2)


def summary() -> str:
    """One line per implementation: faults injected by kind, and the properties' violation counts."""
    lines = []
    for kind, c in REPORT.items():
        injected: Counter[str] = Counter()
        for key, n in c.items():
            if key.startswith("fault_") and n:
                name = key[len("fault_"):]
                for d in ("_to_mcu", "_to_host"):
                    name = name.removesuffix(d)
                injected[name] += n
        lines.append(
            f"{kind}: {c['examples']} examples, {c['commands']} commands; faults injected "
            + ", ".join(f"{k}={v}" for k, v in sorted(injected.items()))
            + f"; wrong fires {c['wrong_fire']}, duplicate fires {c['duplicate_fire']}, late fires "
            f"{c['late_fire']}, outcomes unknown {c['outcome_unknown']}, wrong {c['outcome_wrong']}; "
            f"MCU faults {c['mcu_faults_raised']}, told {sum(v for k, v in c.items() if k.startswith('host_told_fault_'))}"
            f"; ports lost {c['host_told_link_lost']}, restored by themselves {c['host_told_link_restored']}"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("kind", ["python-sim", "c-core"])
def test_command_unanswered_across_a_reset_is_lost_not_resent(kind: str, mcu_factory) -> None:
    """Found by reasoning about the campaign, pinned here deterministically.

    Ack and Fired of a command are lost; the MCU resets; the host used to retransmit the still-unanswered
    command to the new boot, which (no speed measured yet, so no latency compensation, and on real hardware
    an encoder count restarted at 0) accepted it and fired it a second time, at the wrong place. A
    command unanswered when the MCU reboots is in the old boot's coordinates: it must be reported lost.
    """
    counts: Counter[str] = Counter()
    mcu = mcu_factory(kind)
    proxy = FaultProxy(mcu.slave_path, random.Random(1), {k: 0.0 for k in FAULT_KINDS}, counts)
    link = DiverterLink(proxy.slave_path, retransmit_timeout_s=0.3)
    try:
        link.open(timeout=3.0)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        mcu.advance(STEP_COUNTS, STEP_US)
        mcu.advance(STEP_COUNTS, STEP_US)
        proxy.mute_to_host = True
        start = mcu.count
        link.fire_at(1, 0, start + 40, 10)  # on at start + 20 (20 counts of latency)
        time.sleep(0.05)  # the MCU acks into the void
        for _ in range(5):
            mcu.advance(STEP_COUNTS, STEP_US)  # start + 25: fired; Fired lost too
        assert [s.command_id for s in mcu.shots()] == [1]
        time.sleep(0.05)  # let the proxy swallow what the MCU already wrote
        proxy.mute_to_host = False
        mcu.reset()
        ev = None
        deadline = time.monotonic() + 2.0
        while ev is None:
            assert time.monotonic() < deadline, "no ResetEvent"
            ev = next((e for e in link.poll_events() if isinstance(e, ResetEvent)), None)
            time.sleep(0.005)
        assert ev.lost_command_ids == (1,)
        assert link.wait_settled(2.0)
        time.sleep(0.4)  # past the old retransmission time
        for _ in range(10):
            mcu.advance(STEP_COUNTS, STEP_US)
        assert [s.command_id for s in mcu.shots()] == [1], "fired twice"
        assert link.health()["pending"] == 0
    finally:
        link.close()
        proxy.stop()
        mcu.stop()


@pytest.mark.parametrize("kind", ["python-sim", "c-core"])
def test_reports_lost_on_the_line_still_reach_the_host(kind: str, mcu_factory) -> None:
    """The v1 gap, pinned: Fired, the MCU's cancellations and its Fault were sent once, so a noisy line
    hid them from the host. Now they are events, re-sent until acked (PROTOCOL.md §6a)."""
    counts: Counter[str] = Counter()
    mcu = mcu_factory(kind)
    proxy = FaultProxy(mcu.slave_path, random.Random(2), {k: 0.0 for k in FAULT_KINDS}, counts)
    link = DiverterLink(proxy.slave_path)
    try:
        link.open(timeout=3.0)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        mcu.advance(STEP_COUNTS, STEP_US)
        mcu.advance(STEP_COUNTS, STEP_US)
        start = mcu.count
        link.fire_at(1, 1, start + 10, 10)
        link.fire_at(2, 0, start + 500, 10)
        assert link.wait_settled(2.0)
        proxy.mute_to_host = True  # everything the MCU says from now on is lost
        mcu.advance(10, 10_000)  # command 1 fires; its Fired is lost
        mcu.set_estop(True)  # command 2 is cancelled, and the Fault raised: both lost
        time.sleep(0.05)
        proxy.mute_to_host = False
        seen: list[Any] = []
        deadline = time.monotonic() + 3.0
        while not (any(isinstance(e, FiredEvent) for e in seen) and any(isinstance(e, NakEvent) for e in seen)
                   and any(isinstance(e, FaultEvent) for e in seen)):
            assert time.monotonic() < deadline, f"reports never arrived: {seen}"
            mcu.advance(0, 20_000)  # MCU time runs: the events are re-sent
            time.sleep(0.01)
            seen += link.poll_events()
        assert link.wait_resolved(1.0)
        for _ in range(30):  # plenty of further re-send opportunities: told once each all the same
            mcu.advance(0, 50_000)
        time.sleep(0.1)
        seen += link.poll_events()
        assert [(e.command_id, e.actual_count) for e in seen if isinstance(e, FiredEvent)] == [(1, start + 10)]
        assert [(e.command_id, e.reason) for e in seen if isinstance(e, NakEvent)] == [(2, NakReason.ESTOP)]
        assert [(e.code.name, e.detail) for e in seen if isinstance(e, FaultEvent)] == [("ESTOP", 1)]
        assert mcu.events_pending == 0
    finally:
        link.close()
        proxy.stop()
        mcu.stop()


@pytest.mark.parametrize("kind", ["python-sim", "c-core"])
def test_reset_noticed_when_its_hello_is_lost(kind: str, mcu_factory) -> None:
    """v1 never noticed a reset whose Hello was lost: the MCU stayed unconfigured. Its Heartbeat now
    carries the boot id."""
    counts: Counter[str] = Counter()
    mcu = mcu_factory(kind)
    proxy = FaultProxy(mcu.slave_path, random.Random(3), {k: 0.0 for k in FAULT_KINDS}, counts)
    link = DiverterLink(proxy.slave_path)
    try:
        link.open(timeout=3.0)
        link.configure(0.5, DIVERTERS, watchdog_ms=60_000)
        link.fire_at(1, 0, mcu.count + 500, 10)
        assert link.wait_settled(2.0)
        proxy.mute_to_host = True
        mcu.reset()  # its Hello is lost
        time.sleep(0.05)
        proxy.mute_to_host = False
        ev = None
        deadline = time.monotonic() + 3.0
        while ev is None:
            assert time.monotonic() < deadline, "reset never noticed"
            mcu.advance(STEP_COUNTS, 20_000)  # heartbeats every 100 ms of MCU time
            time.sleep(0.01)
            ev = next((e for e in link.poll_events() if isinstance(e, ResetEvent)), None)
        assert ev.boot_id == mcu.boot_id and ev.lost_command_ids == (1,)
        wait_until_true(lambda: mcu.configured, "re-Configure after the unannounced reset")
        wait_until_true(lambda: link.hello is not None and link.hello.boot_id == mcu.boot_id, "the new Hello")
    finally:
        link.close()
        proxy.stop()
        mcu.stop()


def wait_until_true(pred: Any, what: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["python-sim", "c-core"])
def test_fault_campaign(kind: str, mcu_factory) -> None:
    counts = REPORT.setdefault(kind, Counter())

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(plan=scenario())
    @example(plan=CLEAN_LINE)  # the baseline: with no faults, the host must know every outcome
    def campaign(plan: dict[str, Any]) -> None:
        mcu = mcu_factory(kind)
        try:
            run_campaign(mcu, plan, counts)
            counts["examples"] += 1
        finally:
            mcu.stop()

    try:
        campaign()
    finally:
        write_report()
        print(summary())
