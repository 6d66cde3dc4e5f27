"""What `kozan run` starts for the plant: the MQTT publisher and the metrics endpoint (each only
when enabled in the `plant` section). Neither can stop the line: a failure is an alarm and a log
line, and the station sorts on."""
from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class PlantServices:
    def __init__(self) -> None:
        self.publisher: Any = None
        self.metrics: Any = None

    def stop(self) -> None:
        for name, svc in (("metrics", self.metrics), ("publisher", self.publisher)):
            if svc is not None:
                try:
                    svc.stop()
                except Exception:
                    log.exception("plant: stopping the %s failed", name)
        self.publisher = self.metrics = None


def start_plant_services(station: Any) -> PlantServices:
    from station.alarms import Severity

    cfg = station.cfg.plant
    svc = PlantServices()
    if not (cfg.mqtt.enabled or cfg.metrics.enabled):
        return svc
    from station.plant.publisher import default_station_id

    station_id = cfg.station_id or default_station_id()
    if cfg.mqtt.enabled:
        from station.plant.publisher import Publisher

        m = cfg.mqtt
        svc.publisher = Publisher(
            station.records.path, station_id, m.host, m.port,
            outbox_path=station.cfg.resolve(m.outbox_path) if m.outbox_path else None, keepalive_s=m.keepalive_s,
            settle_s=m.settle_s, max_inflight=m.max_inflight, counters_interval_s=m.counters_interval_s,
            health_interval_s=m.health_interval_s, username=m.username,
            confirm_timeout_s=m.confirm_timeout_s, confirm_timeout_max_s=m.confirm_timeout_max_s,
            max_unconfirmed=m.max_unconfirmed,
            password=os.environ.get("KOZAN_MQTT_PASSWORD", ""),
            counters_fn=lambda: station.core.counters.as_dict(),
            health_fn=lambda: {"state": station.state.state.value, "fps": round(station.stats.fps, 2),
                               "latency_ms_p50": round(station.stats.latency_ms_p50, 1),
                               "alarms": [a.code for a in station.alarms.active()]}).start()
        log.info("plant: publishing as %s to %s:%d", station_id, m.host, m.port)
    if cfg.metrics.enabled:
        from station.plant.metrics import MetricsServer, station_snapshot

        svc.metrics = MetricsServer(lambda: station_snapshot(station, svc.publisher), cfg.metrics.host,
                                    cfg.metrics.port)
        try:
            log.info("plant: metrics at %s", svc.metrics.start())
        except OSError as e:
            svc.metrics = None
            station.alarms.raise_("metrics_endpoint", Severity.WARNING, str(e))
    return svc
