"""The plant aggregator: every station's items, counters and health from MQTT into PostgreSQL.

    kozan plant --mqtt HOST:PORT --db postgresql://user@host/dbname

It subscribes with a persistent session (a fixed client id, clean session off, QoS 1), so the
broker keeps what arrives while the aggregator is down. Each message is written and committed
before it is acknowledged (manual PUBACK): a crash between the two only means the broker delivers
it again, and the insert is idempotent (primary key station_id + item_id, ON CONFLICT DO NOTHING).

Per station it follows the items' `prev_id` chain and publishes, retained, on
`kozan/v1/<station>/confirm` the id up to which it holds every item; the station re-sends from
there after it reconnects to a broker that may have lost messages. The confirms go out again
after every (re)connect (a broker that died may have lost the retained ones) and whenever a
station sends an item the plant already holds (it is going back to the last confirm it heard).
It subscribes on every connect: a broker that lost the session does not remember subscriptions.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from station.plant import topics

log = logging.getLogger(__name__)

# Each migration runs once, in order, in one transaction, under an advisory lock (two aggregators
# starting together do not race). Add new ones at the end; never edit one that has shipped.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE plant_items (
        station_id    TEXT NOT NULL,
        item_id       BIGINT NOT NULL,          -- the station's items.id (SQLite rowid)
        prev_id       BIGINT NOT NULL,          -- the id the station published before this one (0: none)
        run_id        BIGINT NOT NULL,
        track_id      BIGINT NOT NULL,
        decided_at    TIMESTAMPTZ NOT NULL,
        first_seen_s  DOUBLE PRECISION NOT NULL,
        decided_s     DOUBLE PRECISION NOT NULL,
        class_name    TEXT NOT NULL,
        confidence    DOUBLE PRECISION NOT NULL,
        votes         JSONB NOT NULL,
        views         INTEGER NOT NULL,
        bin           INTEGER NOT NULL,
        diverter_id   INTEGER,
        reason        TEXT NOT NULL,
        command_id    BIGINT,
        fire_count    BIGINT,
        outcome       TEXT NOT NULL,
        outcome_s     DOUBLE PRECISION,
        fired_count   BIGINT,
        model_version TEXT NOT NULL,
        u_mm DOUBLE PRECISION, y_mm DOUBLE PRECISION, length_mm DOUBLE PRECISION, width_mm DOUBLE PRECISION,
        received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (station_id, item_id)
    );
    CREATE INDEX plant_items_prev ON plant_items (station_id, prev_id);
    CREATE INDEX plant_items_decided ON plant_items (decided_at);
    CREATE TABLE plant_stations (
        station_id    TEXT PRIMARY KEY,
        through_id    BIGINT NOT NULL DEFAULT 0,   -- every item up to this id is stored
        first_seen    TIMESTAMPTZ NOT NULL DEFAULT now(),
        last_seen     TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE plant_counters (
        station_id    TEXT NOT NULL,
        ts            TIMESTAMPTZ NOT NULL,
        run_id        BIGINT,
        payload       JSONB NOT NULL,
        PRIMARY KEY (station_id, ts)
    );
    CREATE TABLE plant_health (
        station_id    TEXT PRIMARY KEY,
        status        TEXT NOT NULL,
        ts            TIMESTAMPTZ,
        payload       JSONB NOT NULL,
        received_at   TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE plant_health_log (
        station_id    TEXT NOT NULL,
        status        TEXT NOT NULL,
        ts            TIMESTAMPTZ,
        payload       JSONB NOT NULL,
        received_at   TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE INDEX plant_health_log_station ON plant_health_log (station_id, received_at);
    """,
    """
    ALTER TABLE plant_items ADD COLUMN decision_outcome TEXT;
    ALTER TABLE plant_items ADD COLUMN lot_id BIGINT;
    ALTER TABLE plant_items ADD COLUMN lot_seq BIGINT;
    ALTER TABLE plant_items ADD COLUMN chain_hash TEXT;
    CREATE INDEX plant_items_lot ON plant_items (station_id, lot_id, lot_seq);
    """,
]

_ITEM_COLS = ("station_id", "item_id", "prev_id", "run_id", "track_id", "decided_at", "first_seen_s", "decided_s",
              "class_name", "confidence", "votes", "views", "bin", "diverter_id", "reason", "command_id",
              "fire_count", "outcome", "outcome_s", "fired_count", "model_version", "u_mm", "y_mm", "length_mm",
              "width_mm", "decision_outcome", "lot_id", "lot_seq", "chain_hash")
_INSERT_ITEM = (f"INSERT INTO plant_items ({', '.join(_ITEM_COLS)}) VALUES ({', '.join(['%s'] * len(_ITEM_COLS))}) "
                "ON CONFLICT (station_id, item_id) DO NOTHING")


def migrate(conn: Any) -> int:
    """Bring the schema up to date; returns the version. Safe to run from many aggregators at once."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(74657)")
        conn.execute("CREATE TABLE IF NOT EXISTS plant_schema (version INTEGER NOT NULL, "
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        have = conn.execute("SELECT COALESCE(MAX(version), 0) FROM plant_schema").fetchone()[0]
        for v, sql in enumerate(MIGRATIONS, start=1):
            if v > have:
                for stmt in sql.split(";"):       # one statement per call (server-side binding)
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute("INSERT INTO plant_schema (version) VALUES (%s)", (v,))
                log.info("plant: schema migrated to version %d", v)
    return len(MIGRATIONS)


def parse_hostport(s: str, default_port: int = 1883) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep:
        return s, default_port
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise ValueError(f"--mqtt {s!r}: expected HOST:PORT, e.g. 127.0.0.1:1883") from None


class Aggregator:
    def __init__(self, mqtt_host: str, mqtt_port: int, dsn: str, *, client_id: str = "kozan-plant",
                 username: str = "", password: str = "", confirm_interval_s: float = 0.5):
        self.mqtt_host, self.mqtt_port = mqtt_host, int(mqtt_port)
        self.dsn = dsn
        self.client_id = client_id
        self.confirm_interval_s = confirm_interval_s
        self.stored = 0                   # item rows inserted
        self.repeats = 0                  # item messages that were already stored
        self.bad = 0                      # messages that could not be read (acknowledged and logged)
        self.connected = False
        self._username, self._password = username, password
        self._through: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._stop = threading.Event()
        self._db_broken = threading.Event()
        self._conn: Any = None
        self._client: Any = None

    # ---- database ---------------------------------------------------------------------------------
    def _connect_db(self) -> None:
        import psycopg

        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
        migrate(self._conn)
        self._through = {s: int(t) for s, t in self._conn.execute("SELECT station_id, through_id FROM plant_stations")}

    def _store(self, station: str, kind: str, d: dict[str, Any]) -> None:
        c = self._conn
        if kind == "items":
            args = [station, int(d["id"]), int(d["prev_id"]), d["run_id"], d["track_id"], d["decided_at"],
                    d["first_seen_s"], d["decided_s"], d["class_name"], d["confidence"],
                    json.dumps(d.get("votes") or {}), d["views"], d["bin"], d.get("diverter_id"), d["reason"],
                    d.get("command_id"), d.get("fire_count"), d["outcome"], d.get("outcome_s"), d.get("fired_count"),
                    d["model_version"], d.get("u_mm"), d.get("y_mm"), d.get("length_mm"), d.get("width_mm"),
                    d.get("decision_outcome"), d.get("lot_id"), d.get("lot_seq"), d.get("chain_hash")]
            with c.transaction():
                cur = c.execute(_INSERT_ITEM, args)
                if cur.rowcount:
                    self.stored += 1
                else:
                    self.repeats += 1
                through = self._through.get(station)
                if through is None:
                    c.execute("INSERT INTO plant_stations (station_id) VALUES (%s) ON CONFLICT DO NOTHING", (station,))
                    through = int(c.execute("SELECT through_id FROM plant_stations WHERE station_id=%s",
                                            (station,)).fetchone()[0])
                new = through
                while True:      # follow the chain as far as it is complete
                    row = c.execute("SELECT item_id FROM plant_items WHERE station_id=%s AND prev_id=%s "
                                    "ORDER BY item_id LIMIT 1", (station, new)).fetchone()
                    if row is None:
                        break
                    new = int(row[0])
                if new != through:
                    c.execute("UPDATE plant_stations SET through_id=%s, last_seen=now() WHERE station_id=%s",
                              (new, station))
            self._through[station] = new
            if new != through or not cur.rowcount:   # a repeat: the station wants to hear the confirm again
                with self._dirty_lock:
                    self._dirty.add(station)
        elif kind == "counters":
            c.execute("INSERT INTO plant_counters (station_id, ts, run_id, payload) VALUES (%s, %s, %s, %s) "
                      "ON CONFLICT DO NOTHING", (station, d["ts"], d.get("run_id"), json.dumps(d)))
        elif kind == "health":
            status = str(d.get("status", "unknown"))
            with c.transaction():
                c.execute("INSERT INTO plant_health (station_id, status, ts, payload) VALUES (%s, %s, %s, %s) "
                          "ON CONFLICT (station_id) DO UPDATE SET status=excluded.status, ts=excluded.ts, "
                          "payload=excluded.payload, received_at=now()", (station, status, d.get("ts"), json.dumps(d)))
                c.execute("INSERT INTO plant_health_log (station_id, status, ts, payload) VALUES (%s, %s, %s, %s)",
                          (station, status, d.get("ts"), json.dumps(d)))

    # ---- MQTT -------------------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("plant: broker refused the connection: %s", reason_code)
            return
        self.connected = True
        with self._dirty_lock:                  # the broker may have lost the retained confirms
            self._dirty.update(self._through)
        client.subscribe([(f"{topics.ROOT}/+/items", 1), (f"{topics.ROOT}/+/counters", 1),
                          (f"{topics.ROOT}/+/health", 1)])
        log.info("plant: connected to %s:%d (session present: %s)", self.mqtt_host, self.mqtt_port,
                 flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = False

    def _on_message(self, client, userdata, msg) -> None:
        if self._db_broken.is_set():
            return                       # not acknowledged: the broker delivers it again later
        parsed = topics.parse_topic(msg.topic)
        try:
            if parsed is None or parsed[1] not in ("items", "counters", "health"):
                raise ValueError(f"unexpected topic {msg.topic}")
            d = topics.loads(msg.payload)
            if d.get("station") not in (None, parsed[0]):
                raise ValueError(f"payload station {d.get('station')!r} on topic {msg.topic}")
        except (ValueError, UnicodeDecodeError) as e:
            self.bad += 1
            log.error("plant: dropped an unreadable message on %s: %s", msg.topic, e)
            client.ack(msg.mid, msg.qos)
            return
        try:
            self._store(parsed[0], parsed[1], d)
        except (KeyError, TypeError, ValueError) as e:
            self.bad += 1
            log.error("plant: dropped a malformed %s message from %s: %s", parsed[1], parsed[0], e)
        except Exception as e:
            import psycopg

            if isinstance(e, psycopg.errors.DataError | psycopg.errors.IntegrityError):
                self.bad += 1
                log.error("plant: dropped a %s message from %s the database refused: %s", parsed[1], parsed[0], e)
            else:   # the database is gone: stop acknowledging, reconnect it, then the broker
                log.error("plant: database write failed (%s); reconnecting", e)
                self._db_broken.set()
                return
        client.ack(msg.mid, msg.qos)

    def _publish_confirms(self) -> None:
        with self._dirty_lock:
            stations, self._dirty = self._dirty, set()
        for station in sorted(stations):
            self._client.publish(topics.topic(station, "confirm"),
                                 topics.dumps({"v": 1, "station": station, "through": self._through[station],
                                               "plant": self.client_id}), qos=1, retain=True)

    def run(self) -> None:
        """Run until `stop()` (or a signal handler calling it)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._connect_db()
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        clean_session=False, manual_ack=True)
        if self._username:
            c.username_pw_set(self._username, self._password or None)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        self._client = c
        c.connect_async(self.mqtt_host, self.mqtt_port, keepalive=15)
        c.loop_start()
        try:
            while not self._stop.wait(self.confirm_interval_s):
                if self._db_broken.is_set():
                    c.disconnect()
                    c.loop_stop()
                    while not self._stop.is_set():
                        try:
                            self._connect_db()
                            break
                        except Exception as e:
                            log.error("plant: database still unreachable (%s); retrying", e)
                            self._stop.wait(2.0)
                    self._db_broken.clear()
                    c.connect_async(self.mqtt_host, self.mqtt_port, keepalive=15)
                    c.loop_start()
                if self.connected:
                    self._publish_confirms()
        finally:
            c.disconnect()
            c.loop_stop()
            if self._conn is not None:
                self._conn.close()

    def stop(self) -> None:
        self._stop.set()
