"""Station -> real Mosquitto -> `kozan plant` -> real PostgreSQL, with outages in the middle.

Items are written through station.records' public API while the publisher tails them; the broker
is SIGKILLed and restarted mid-run, and so is the aggregator. At the end PostgreSQL must hold
exactly the SQLite rows: none lost, none twice, every column equal.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from station.records import ItemRecord, Records
from tests.plant.conftest import REPO_ROOT, wait_for

import psycopg  # noqa: E402  (the dev extra installs it; a missing one must fail, not skip)

STATION = "line-7"


def item(track_id: int, outcome: str, command_id: int | None) -> ItemRecord:
    cls = ("board_high", "li_ion_cell", "alkaline", "board_low")[track_id % 4]
    return ItemRecord(track_id=track_id, first_seen_s=track_id * 0.1, decided_s=track_id * 0.1 + 0.7, class_name=cls,
                      confidence=0.5 + (track_id % 50) / 100.0, votes={cls: 7.25, "nimh": 0.125}, views=5 + track_id % 7,
                      bin=track_id % 5, diverter_id=(track_id % 4) + 1 if command_id else None, reason="rule",
                      command_id=command_id, fire_count=1000 + track_id if command_id else None, outcome=outcome,
                      model_version="det-test", u_mm=-1.5 * track_id, y_mm=100.0 + track_id / 3, length_mm=55.5,
                      width_mm=14.25)


class Producer:
    """Writes items the way the station core does: most final at once, some 'sent' and then fired."""

    def __init__(self, records: Records):
        self.records = records
        self.n = 0
        self._late: list[tuple[float, int]] = []

    def produce(self, count: int, rate_hz: float = 300.0) -> None:
        for _ in range(count):
            k = self.n
            self.n += 1
            if k % 5 == 0:                               # a divert: the MCU answers a little later
                self.records.item_decided(item(k, "sent", command_id=10_000 + k))
                self._late.append((time.monotonic() + 0.15, 10_000 + k))
            else:
                self.records.item_decided(item(k, "manual" if k % 5 == 1 else "missed", command_id=None))
            self.settle_late()
            time.sleep(1.0 / rate_hz)
        self.settle_late(all_=True)      # the MCU answers before the test pauses the line

    def settle_late(self, all_: bool = False) -> None:
        now = time.monotonic()
        while self._late and (all_ or self._late[0][0] <= now):
            _, cid = self._late.pop(0)
            if cid % 7 == 0:                             # some never hear back: they go out after settle_s
                continue
            self.records.item_outcome(cid, "fired", 1.0, fired_count=cid - 9_000)


def start_aggregator(broker, postgres, log_path: Path, client_id: str = "kozan-plant") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "station.cli", "plant", "--mqtt", f"127.0.0.1:{broker.port}",
                             "--db", postgres.dsn, "--client-id", client_id], cwd=REPO_ROOT, stdout=open(log_path, "ab"),
                            stderr=subprocess.STDOUT)


def pg_rows(dsn: str) -> dict[int, dict]:
    with psycopg.connect(dsn) as c:
        cur = c.execute("SELECT * FROM plant_items WHERE station_id=%s", (STATION,))
        names = [d.name for d in cur.description]
        return {r[names.index("item_id")]: dict(zip(names, r)) for r in cur.fetchall()}


def pg_count(dsn: str) -> int:
    try:
        with psycopg.connect(dsn) as c:
            return c.execute("SELECT COUNT(*) FROM plant_items WHERE station_id=%s", (STATION,)).fetchone()[0]
    except psycopg.Error:
        return -1


def sqlite_rows(path: Path) -> dict[int, dict]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM items")}
    finally:
        db.close()


def pg_duplicates(dsn: str, station: str) -> int:
    """Rows beyond one per (station, item id): 0 by the primary key, counted anyway."""
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT COUNT(*) - COUNT(DISTINCT item_id) FROM plant_items WHERE station_id=%s",
                         (station,)).fetchone()[0]


def report(what: str, sq: dict[int, dict], pg: dict[int, dict], dsn: str, station: str) -> tuple[int, int]:
    lost = len(set(sq) - set(pg))
    dup = pg_duplicates(dsn, station) + len(set(pg) - set(sq))
    print(f"\n{what}: {len(sq)} items in SQLite, {len(pg)} in PostgreSQL: lost {lost}, duplicated {dup}")
    return lost, dup


def assert_same(sq: dict[int, dict], pg: dict[int, dict]) -> None:
    assert sorted(pg) == sorted(sq), (f"lost {sorted(set(sq) - set(pg))[:20]}, "
                                      f"unexpected {sorted(set(pg) - set(sq))[:20]}")
    for i, s in sq.items():
        p = pg[i]
        assert p["decided_at"] == datetime.fromisoformat(s["decided_at"]), i
        assert p["votes"] == json.loads(s["votes_json"]), i
        for k, v in s.items():
            if k in ("id", "decided_at", "votes_json"):
                continue
            assert p[k] == v, f"item {i}: {k} is {p[k]!r} in PostgreSQL, {v!r} in SQLite"


def test_outages_lose_and_duplicate_nothing(broker, postgres, tmp_path):
    from station.plant.publisher import Publisher

    agg_log = tmp_path / "aggregator.log"
    agg = start_aggregator(broker, postgres, agg_log)
    # the plant's session must exist before the station publishes: a broker drops what nobody subscribed to
    wait_for(lambda: agg_log.exists() and b"connected to" in agg_log.read_bytes(), 60, "the aggregator to subscribe")
    records_path = tmp_path / "kozan.sqlite"
    records = Records(records_path, batch_s=0.05)
    records.start_run("sim-fast", "det-test", {"test": True})
    pub = Publisher(records_path, STATION, "127.0.0.1", broker.port, settle_s=3.0, max_inflight=50, poll_s=0.05,
                    counters_interval_s=0.5, health_interval_s=1.0, confirm_timeout_s=2.0,
                    confirm_timeout_max_s=8.0).start()
    prod = Producer(records)
    aggs = [agg]
    try:
        wait_for(lambda: pub.connected, 15, "the publisher to connect")
        prod.produce(250)
        wait_for(lambda: pg_count(postgres.dsn) > 100, 20, "items to reach PostgreSQL")

        broker.kill()                                    # outage 1: the broker dies (SIGKILL) mid-run
        prod.produce(200)                                # the line goes on; items wait in SQLite
        wait_for(lambda: not pub.connected, 10, "the publisher to notice the broker is gone")
        n_down = pg_count(postgres.dsn)
        time.sleep(0.5)
        broker.start()
        prod.produce(200)

        agg.send_signal(signal.SIGKILL)                  # outage 2: the aggregator dies mid-stream
        agg.wait(10)
        prod.produce(150)
        agg = start_aggregator(broker, postgres, agg_log)
        aggs.append(agg)
        prod.produce(100)
        prod.settle_late(all_=True)
        records.end_run({"decided": prod.n})
        records.flush()

        n = prod.n
        wait_for(lambda: pg_count(postgres.dsn) >= n and pub.acked_id >= n and pub.confirmed_id >= n, 45,
                 "every item to be stored and confirmed", every=0.25)
    except BaseException:
        for a in aggs:
            a.kill()
        raise
    finally:
        pub.stop()
        records.close()

    sq, pg = sqlite_rows(records_path), pg_rows(postgres.dsn)
    assert report("broker + aggregator outages", sq, pg, postgres.dsn, STATION) == (0, 0)
    assert len(sq) == n == 900
    assert_same(sq, pg)                                  # nothing lost, nothing twice, every column equal
    assert n_down < n
    with psycopg.connect(postgres.dsn) as c:
        assert c.execute("SELECT through_id FROM plant_stations WHERE station_id=%s", (STATION,)).fetchone()[0] == n
        counters = wait_for(lambda: c.execute(
            "SELECT payload FROM plant_counters WHERE station_id=%s ORDER BY ts DESC LIMIT 1",
            (STATION,)).fetchone(), 10, "counters")
        assert counters[0]["run_id"] == 1
        wait_for(lambda: c.execute("SELECT status, payload->>'reason' FROM plant_health WHERE station_id=%s",
                                   (STATION,)).fetchone() == ("offline", "stopped"), 10,
                 "the station's clean stop to show as offline")
    # ids start at 1: track k is item k + 1; tracks 0, 5, 10, ... are diverts, command 10_000 + k
    assert sq[6]["outcome"] == "fired" and pg[6]["outcome"] == "fired"    # settled before it went out
    assert sq[11]["outcome"] == "sent" and pg[11]["outcome"] == "sent"    # never answered: went after settle_s
    agg.send_signal(signal.SIGTERM)
    try:
        out = agg.wait(15)
    finally:
        agg.kill()
    assert out == 0, agg_log.read_text()[-3000:]
    print(f"plant link: {n} items, publisher rewinds {pub.rewinds}, messages published {pub.published}")


PUBLISHER_MAIN = """
import sys, time
from station.plant.publisher import Publisher
p = Publisher(sys.argv[1], sys.argv[2], "127.0.0.1", int(sys.argv[3]), settle_s=0.5, max_inflight=20, poll_s=0.05,
              health_interval_s=60).start()
while True:
    time.sleep(1)
"""


def test_station_killed_mid_stream_resumes_from_its_cursor(broker, postgres, tmp_path):
    """kill -9 of the station's process: the will says offline, and a new process sends the rest once."""
    station = "line-8"
    agg = start_aggregator(broker, postgres, tmp_path / "aggregator.log")
    wait_for(lambda: b"connected to" in (tmp_path / "aggregator.log").read_bytes(), 60, "the aggregator to subscribe")
    records_path = tmp_path / "kozan.sqlite"
    records = Records(records_path, batch_s=0.05)
    records.start_run("sim-fast", "det-test", {})
    prod = Producer(records)

    def count() -> int:
        try:
            with psycopg.connect(postgres.dsn) as c:
                return c.execute("SELECT COUNT(*) FROM plant_items WHERE station_id=%s", (station,)).fetchone()[0]
        except psycopg.Error:
            return -1

    def health() -> tuple | None:
        with psycopg.connect(postgres.dsn) as c:
            return c.execute("SELECT status, payload->>'reason' FROM plant_health WHERE station_id=%s",
                             (station,)).fetchone()

    def publisher() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", PUBLISHER_MAIN, str(records_path), station, str(broker.port)],
                                cwd=REPO_ROOT)

    procs = [agg, publisher()]
    try:
        prod.produce(200)
        wait_for(lambda: count() > 20, 30, "items from the first station process")
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(10)
        wait_for(lambda: health() == ("offline", "connection lost"), 20, "the will to mark the station offline")
        prod.produce(100)
        records.end_run({})
        procs.append(publisher())
        wait_for(lambda: count() >= 300, 40, "the restarted station to send the rest")
        wait_for(lambda: health() == ("online", None), 20, "the station to be online again")
    finally:
        for p in procs:
            p.kill()
        records.close()
    sq = sqlite_rows(records_path)
    with psycopg.connect(postgres.dsn) as c:
        cur = c.execute("SELECT * FROM plant_items WHERE station_id=%s", (station,))
        names = [d.name for d in cur.description]
        pg = {r[names.index("item_id")]: dict(zip(names, r)) for r in cur.fetchall()}
    assert report("station killed", sq, pg, postgres.dsn, station) == (0, 0)
    assert len(sq) == 300
    assert_same(sq, pg)


def test_aggregator_started_late_and_killed_resends_from_the_confirm(broker, postgres, tmp_path):
    """The station publishes before the plant has any session on the broker (the broker PUBACKs and
    drops those items), then the aggregator is SIGKILLed mid-stream and restarted. The station's
    confirm watchdog must notice the plant lagging its acks and send again from the confirm."""
    from station.plant.publisher import Publisher

    station, client_id = "line-9", "kozan-plant-late"      # a client id the broker has never seen
    agg_log = tmp_path / "aggregator.log"
    records_path = tmp_path / "kozan.sqlite"
    records = Records(records_path, batch_s=0.05)
    records.start_run("sim-fast", "det-test", {})
    pub = Publisher(records_path, station, "127.0.0.1", broker.port, settle_s=1.0, max_inflight=50, poll_s=0.05,
                    counters_interval_s=1.0, health_interval_s=1.0, confirm_timeout_s=1.0,
                    confirm_timeout_max_s=4.0, max_unconfirmed=150).start()
    prod = Producer(records)
    aggs: list[subprocess.Popen] = []

    def count() -> int:
        try:
            with psycopg.connect(postgres.dsn) as c:
                return c.execute("SELECT COUNT(*) FROM plant_items WHERE station_id=%s", (station,)).fetchone()[0]
        except psycopg.Error:
            return -1

    try:
        wait_for(lambda: pub.connected, 15, "the publisher to connect")
        prod.produce(200)                          # nobody subscribed: acknowledged and dropped by the broker
        wait_for(lambda: pub.acked_id >= 150, 15, "the broker to acknowledge the first window")
        assert pub.acked_id <= 150, "max_unconfirmed must hold the rest in SQLite"
        assert count() <= 0
        aggs.append(start_aggregator(broker, postgres, agg_log, client_id))
        wait_for(lambda: count() >= 200, 40, "the re-sent items to reach PostgreSQL")
        prod.produce(100)
        aggs[-1].send_signal(signal.SIGKILL)        # the broker keeps its session's messages meanwhile
        aggs[-1].wait(10)
        prod.produce(100)
        aggs.append(start_aggregator(broker, postgres, agg_log, client_id))
        records.end_run({})
        records.flush()
        n = prod.n
        wait_for(lambda: count() >= n and pub.acked_id >= n and pub.confirmed_id >= n, 45,
                 "every item to be stored and confirmed", every=0.25)
    finally:
        pub.stop()
        records.close()
        for a in aggs:
            a.kill()
    sq = sqlite_rows(records_path)
    with psycopg.connect(postgres.dsn) as c:
        cur = c.execute("SELECT * FROM plant_items WHERE station_id=%s", (station,))
        names = [d.name for d in cur.description]
        pg = {r[names.index("item_id")]: dict(zip(names, r)) for r in cur.fetchall()}
    assert report("aggregator late + killed", sq, pg, postgres.dsn, station) == (0, 0)
    assert len(sq) == 400
    assert_same(sq, pg)
    assert pub.rewinds >= 1
    print(f"aggregator late + killed: publisher rewinds {pub.rewinds}, messages published {pub.published}")
