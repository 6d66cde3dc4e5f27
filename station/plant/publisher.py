"""The station's MQTT publisher: item rows, counters and health, from the records database.

The records SQLite file is the durable outbox. In its own thread the publisher reads item rows in
id order past its cursor, publishes each at QoS 1 and moves the cursor over the rows the broker
has acknowledged (PUBACK) without a gap; the cursor lives in a small file of its own
(`outbox.OutboxCursor`). A broker that is down only means the cursor waits: the rows stay in
SQLite and go out, in order, once the broker is back. Nothing here is ever called by the sorting
loop, so a slow or absent broker cannot hold the line up.

A row goes out once its outcome is settled (the MCU answered: fired, missed, nak, ...), or once
it is `settle_s` old, or once its run has ended — so the plant gets the outcome, not "sent".

End to end: each item carries `prev_id`, the id of the row published before it. The plant
aggregator follows that chain and answers on `.../confirm` with the id up to which it has stored
everything. A broker that restarts may have lost messages it had already acknowledged (mosquitto
keeps them in memory between autosaves), so after every reconnect the publisher goes back to the
confirmed id and sends again from there; the aggregator's insert is idempotent, so the repeats
cost bandwidth, never a duplicate row.

A reconnect is not enough: a broker that lost the aggregator's session (killed before it saved
it) acknowledges what the station re-sends and drops it, because nobody is subscribed yet. So,
while connected, the publisher also watches the confirm: when `confirmed_id` has stayed behind
`acked_id` for `confirm_timeout_s`, it goes back to `confirmed_id` and sends again from there;
each further rewind without progress waits twice as long (up to `confirm_timeout_max_s`), and
progress resets the wait. And it never runs more than `max_unconfirmed` items ahead of the
plant's confirm: with the aggregator away the rest waits in SQLite, not in the broker's queue,
so a rewind re-sends a bounded window.
"""
from __future__ import annotations

import collections
import logging
import socket
import sqlite3
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from station.plant import topics
from station.plant.outbox import OutboxCursor, default_outbox_path

log = logging.getLogger(__name__)


def default_station_id() -> str:
    name = socket.gethostname().split(".")[0] or "station"
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in name)[:64]


class Publisher:
    def __init__(self, records_path: str | Path, station_id: str, host: str = "127.0.0.1", port: int = 1883, *,
                 outbox_path: str | Path | None = None, keepalive_s: int = 15, settle_s: float = 10.0,
                 max_inflight: int = 100, poll_s: float = 0.2, counters_interval_s: float = 5.0,
                 health_interval_s: float = 10.0, username: str = "", password: str = "",
                 confirm_timeout_s: float = 10.0, confirm_timeout_max_s: float = 300.0, max_unconfirmed: int = 2000,
                 counters_fn: Callable[[], dict[str, Any]] | None = None,
                 health_fn: Callable[[], dict[str, Any]] | None = None):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.station = topics.check_station_id(station_id)
        self.records_path = Path(records_path)
        self.host, self.port = host, int(port)
        self.settle_s = settle_s
        self.max_inflight = max_inflight
        self.poll_s = poll_s
        self.counters_interval_s = counters_interval_s
        self.health_interval_s = health_interval_s
        self.counters_fn = counters_fn
        self.health_fn = health_fn
        self.confirm_timeout_s = float(confirm_timeout_s)
        self.confirm_timeout_max_s = max(float(confirm_timeout_max_s), self.confirm_timeout_s)
        self.max_unconfirmed = int(max_unconfirmed)     # 0: no limit
        self._stall_wait_s = self.confirm_timeout_s     # grows while rewinds bring no progress
        self._progress_at = time.monotonic()            # the confirm last moved (or caught up, or we (re)connected)
        self._progress_mark = -2                        # set on the first look
        self.cursor = OutboxCursor(outbox_path or default_outbox_path(self.records_path), self.station,
                                   self.records_path)
        self.acked_id = self.cursor.acked_id
        self.confirmed_id = self.cursor.confirmed_id
        self.connected = False
        self.published = 0            # item messages handed to the client (repeats included)
        self.rewinds = 0
        self.last_error = ""
        self.backlog = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._acks: collections.deque[int] = collections.deque()   # PUBACK'd mids, from the network thread
        self._connects = 0
        self._seen_connects = 0
        self._next_after = self.acked_id          # last row handed to the client
        self._mid_row: dict[int, int] = {}
        self._sent_order: collections.deque[int] = collections.deque()
        self._acked_rows: set[int] = set()
        self._db: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None

        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"kozan-station-{self.station}",
                        clean_session=True)
        if username:
            c.username_pw_set(username, password or None)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        c.will_set(topics.topic(self.station, "health"),
                   topics.dumps({"v": 1, "station": self.station, "status": "offline", "reason": "connection lost"}),
                   qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        self._client = c
        self._keepalive = keepalive_s

    # ---- paho callbacks (network thread): record and wake, never block ----------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.warning("plant: %s", self.last_error)
            return
        self.connected = True
        self._connects += 1
        client.subscribe(topics.topic(self.station, "confirm"), qos=1)
        client.publish(topics.topic(self.station, "health"), topics.dumps(self._health("online")), qos=1, retain=True)
        log.info("plant: connected to %s:%d", self.host, self.port)
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected:
            log.warning("plant: lost the broker %s:%d (%s); items wait in the records database",
                        self.host, self.port, reason_code)
        self.connected = False

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._acks.append(mid)
        self._wake.set()

    def _on_message(self, client, userdata, msg) -> None:
        try:
            d = topics.loads(msg.payload)
            self.confirmed_id = int(d["through"])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("plant: ignored a confirm message I cannot read (%s): %r", e, msg.payload[:200])

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "Publisher":
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="plant-publisher", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain_s: float = 2.0) -> None:
        """Publish what is settled (for up to `drain_s`), say offline, disconnect. What is left
        waits in the records database for the next start."""
        if self._thread is None:
            return
        end = time.monotonic() + drain_s
        while time.monotonic() < end and self.connected and (self.backlog or self._sent_order):
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        self._thread = None
        if self.connected:
            info = self._client.publish(topics.topic(self.station, "health"),
                                        topics.dumps(self._health("offline", reason="stopped")), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        self._client.disconnect()
        self._client.loop_stop()
        self.cursor.close()
        if self._db is not None:
            self._db.close()

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected, "acked_id": self.acked_id, "confirmed_id": self.confirmed_id,
                "backlog": self.backlog, "inflight": len(self._sent_order), "published": self.published,
                "rewinds": self.rewinds, "last_error": self.last_error}

    # ---- the publisher thread ---------------------------------------------------------------------
    def _run(self) -> None:
        saved = (self.acked_id, self.confirmed_id)
        next_counters = next_health = 0.0
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            try:
                if self._seen_connects != self._connects:
                    self._seen_connects = self._connects
                    self._after_reconnect()
                self._take_acks()
                if self.connected:
                    self._watch_confirm()
                if self.connected:
                    self._fill_window()
                now = time.monotonic()
                if (self.acked_id, self.confirmed_id) != saved:
                    self.cursor.save(self.acked_id, self.confirmed_id)
                    saved = (self.acked_id, self.confirmed_id)
                if self.connected and now >= next_counters:
                    next_counters = now + self.counters_interval_s
                    self._publish_counters()
                if self.connected and now >= next_health:
                    next_health = now + self.health_interval_s
                    self._client.publish(topics.topic(self.station, "health"), topics.dumps(self._health("online")),
                                         qos=1, retain=True)
            except sqlite3.Error as e:          # the records file is busy or not there yet: try again
                self.last_error = f"records: {e}"
                log.debug("plant: %s", self.last_error)
                self._close_db()
                self._stop.wait(1.0)
            except Exception as e:              # never let the thread die silently
                self.last_error = repr(e)
                log.exception("plant publisher step failed; retrying")
                self._stop.wait(1.0)
        self._take_acks()
        if (self.acked_id, self.confirmed_id) != saved:
            self.cursor.save(self.acked_id, self.confirmed_id)

    def _after_reconnect(self) -> None:
        # what the broker acknowledged before may have died with it; the aggregator's word is the proof
        if 0 <= self.confirmed_id < self.acked_id:
            log.info("plant: reconnected; sending again from item %d (confirmed by the plant; broker had acked %d)",
                     self.confirmed_id, self.acked_id)
            self.acked_id = self.confirmed_id
            self.rewinds += 1
        self._progress_at = time.monotonic()
        self._reset_window()

    def _watch_confirm(self) -> None:
        """Go back to the plant's confirmed id when it has stayed behind the broker's acks too long:
        the broker acknowledged items it then dropped (a lost session: nobody was subscribed)."""
        now = time.monotonic()
        confirmed = max(self.confirmed_id, 0)
        if confirmed != self._progress_mark:            # the plant moved: all is well, start over
            if confirmed > self._progress_mark:
                self._stall_wait_s = self.confirm_timeout_s
            self._progress_mark = confirmed
            self._progress_at = now
        if confirmed >= self.acked_id:                  # nothing acked that the plant has not confirmed
            self._progress_at = now
            return
        if now - self._progress_at < self._stall_wait_s:
            return
        log.warning("plant: the plant confirmed item %d but the broker acked %d, and no progress for %.0f s; "
                    "sending again from item %d", confirmed, self.acked_id, now - self._progress_at, confirmed + 1)
        self.acked_id = confirmed
        self.rewinds += 1
        self._stall_wait_s = min(self._stall_wait_s * 2, self.confirm_timeout_max_s)
        self._progress_at = now
        self._reset_window()

    def _reset_window(self) -> None:
        self._mid_row.clear()
        self._sent_order.clear()
        self._acked_rows.clear()
        self._acks.clear()
        self._next_after = self.acked_id

    def _take_acks(self) -> None:
        while self._acks:
            row = self._mid_row.pop(self._acks.popleft(), None)
            if row is not None:
                self._acked_rows.add(row)
        while self._sent_order and self._sent_order[0] in self._acked_rows:
            self._acked_rows.discard(self._sent_order[0])
            self.acked_id = self._sent_order.popleft()

    def _records(self) -> sqlite3.Connection:
        if self._db is None:
            if not self.records_path.exists():
                raise sqlite3.OperationalError(f"{self.records_path} does not exist yet")
            db = sqlite3.connect(f"file:{self.records_path}?mode=ro", uri=True, check_same_thread=False)
            db.row_factory = sqlite3.Row
            self._db = db
        return self._db

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None

    def _fill_window(self) -> None:
        room = self.max_inflight - len(self._sent_order)
        if self.max_unconfirmed > 0:     # the broker's queue is no outbox: the rest waits here
            room = min(room, max(self.confirmed_id, 0) + self.max_unconfirmed - self._next_after)
        db = self._records()
        if room > 0:
            rows = db.execute("SELECT i.*, r.ended_at AS run_ended_at FROM items i JOIN runs r ON r.id = i.run_id "
                              "WHERE i.id > ? ORDER BY i.id LIMIT ?", (self._next_after, room)).fetchall()
            now = datetime.now(timezone.utc)
            for r in rows:
                row = dict(r)
                if not self._settled(row, now):
                    break
                info = self._client.publish(topics.topic(self.station, "items"),
                                            topics.item_payload(self.station, row, self._next_after), qos=1)
                if info.rc != 0:              # the connection went while we were sending: retry later
                    self.last_error = f"publish refused (rc {info.rc})"
                    break
                self._mid_row[info.mid] = row["id"]
                self._sent_order.append(row["id"])
                self._next_after = row["id"]
                self.published += 1
        self.backlog = db.execute("SELECT COUNT(*) FROM items WHERE id > ?", (self.acked_id,)).fetchone()[0]
        if not self.backlog and self.acked_id and not self._sent_order:
            top = db.execute("SELECT MAX(id) FROM items").fetchone()[0] or 0
            if top < self.acked_id and not self.last_error.startswith("cursor"):
                self.last_error = (f"cursor at item {self.acked_id} but {self.records_path} ends at {top}: "
                                   "was the records file replaced? give the station a new plant.station_id")
                log.error("plant: %s", self.last_error)

    def _settled(self, row: dict[str, Any], now: datetime) -> bool:
        if row["outcome"] not in topics.PROVISIONAL_OUTCOMES or row["run_ended_at"]:
            return True
        try:
            age = (now - datetime.fromisoformat(row["decided_at"])).total_seconds()
        except (TypeError, ValueError):
            return True
        return age >= self.settle_s

    def _publish_counters(self) -> None:
        db = self._records()
        run = db.execute("SELECT MAX(id) FROM runs").fetchone()[0]
        d: dict[str, Any] = {"v": 1, "station": self.station, "ts": _utc_now(), "run_id": run,
                             "outbox": {"acked_id": self.acked_id, "confirmed_id": self.confirmed_id,
                                        "backlog": self.backlog}}
        if run is not None:
            per_bin: dict[str, int] = {}
            per_class: dict[str, int] = {}
            per_outcome: dict[str, int] = {}
            n = 0
            for b, cls, outcome, k in db.execute("SELECT bin, class_name, outcome, COUNT(*) FROM items WHERE run_id=? "
                                                 "GROUP BY bin, class_name, outcome", (run,)):
                n += k
                per_bin[str(b)] = per_bin.get(str(b), 0) + k
                per_class[cls] = per_class.get(cls, 0) + k
                key = outcome.split(":")[0]
                per_outcome[key] = per_outcome.get(key, 0) + k
            d.update(items=n, per_bin=per_bin, per_class=per_class, per_outcome=per_outcome)
        if self.counters_fn is not None:
            try:
                d["station_counters"] = self.counters_fn()
            except Exception:
                log.exception("plant: counters hook failed (ignored)")
        self._client.publish(topics.topic(self.station, "counters"), topics.dumps(d), qos=1, retain=True)

    def _health(self, status: str, **extra: Any) -> dict[str, Any]:
        d: dict[str, Any] = {"v": 1, "station": self.station, "status": status, "ts": _utc_now(),
                             "outbox": {"acked_id": self.acked_id, "confirmed_id": self.confirmed_id,
                                        "backlog": self.backlog}, **extra}
        if self.health_fn is not None and status == "online":
            try:
                d.update(self.health_fn())
            except Exception:
                log.exception("plant: health hook failed (ignored)")
        return d


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
