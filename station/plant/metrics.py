"""The station's Prometheus endpoint: http://<metrics.host>:<metrics.port>/metrics (loopback by default).

Everything is read at scrape time from one `snapshot()` callable (runtime.station_snapshot builds it
from a running Station), in the scraper's thread: the loop never waits for a scrape.

    kozan_items_bin_total{bin}            items decided in this run, per bin (0 = manual)
    kozan_items_class_total{class}        items decided in this run, per class
    kozan_items_outcome_total{outcome}    fired / missed / manual / nak / ...
    kozan_frames_total, kozan_frames_dropped_total
    kozan_loop_fps, kozan_loop_latency_seconds{quantile="0.5"|"1"}
    kozan_line_state{state}               1 for the state the line is in
    kozan_link_rtt_seconds, kozan_link_{retries,timeouts,resyncs,crc_errors,resets}_total, kozan_link_up
    kozan_alarms_active{code, severity}   1 per active alarm
    kozan_plant_connected, kozan_plant_backlog_items, kozan_plant_acked_item_id, kozan_plant_confirmed_item_id
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

LINE_STATES = ("idle", "running", "paused", "fault", "estop")


class StationCollector:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            s = self.snapshot()
        except Exception:
            log.exception("metrics: snapshot failed")
            return
        per_bin = CounterMetricFamily("kozan_items_bin", "items decided in the current run, per bin "
                                      "(0 = manual / end of belt)", labels=["bin"])
        for b, n in sorted((s.get("per_bin") or {}).items()):
            per_bin.add_metric([str(b)], n)
        yield per_bin
        per_class = CounterMetricFamily("kozan_items_class", "items decided in the current run, per class",
                                        labels=["class"])
        for cls, n in sorted((s.get("per_class") or {}).items()):
            per_class.add_metric([cls], n)
        yield per_class
        out = CounterMetricFamily("kozan_items_outcome", "items by outcome in the current run", labels=["outcome"])
        for k, n in sorted((s.get("outcomes") or {}).items()):
            out.add_metric([k], n)
        yield out
        for name, key, doc in (("kozan_frames", "frames", "frames processed"),
                               ("kozan_frames_dropped", "dropped_frames", "frames replaced before the loop took them")):
            if s.get(key) is not None:
                yield CounterMetricFamily(name, doc, value=s[key])
        if s.get("fps") is not None:
            yield GaugeMetricFamily("kozan_loop_fps", "frames per second through the loop (last 2 s)", value=s["fps"])
        if s.get("latency_s_p50") is not None:
            lat = GaugeMetricFamily("kozan_loop_latency_seconds", "capture to decisions, last 2 s",
                                    labels=["quantile"])
            lat.add_metric(["0.5"], s["latency_s_p50"])
            lat.add_metric(["1"], s.get("latency_s_max") or 0.0)
            yield lat
        if s.get("state"):
            st = GaugeMetricFamily("kozan_line_state", "1 for the state the line is in", labels=["state"])
            for name in LINE_STATES:
                st.add_metric([name], 1.0 if s["state"] == name else 0.0)
            yield st
        link = s.get("link")
        if link is not None:
            yield GaugeMetricFamily("kozan_link_up", "diverter link answering (1) or not (0)",
                                    value=0.0 if link.get("io_error") else 1.0)
            if link.get("rtt_ms") is not None:
                yield GaugeMetricFamily("kozan_link_rtt_seconds", "diverter link round trip, median",
                                        value=link["rtt_ms"] / 1000.0)
            for k in ("retries", "timeouts", "resyncs", "crc_errors", "resets"):
                if isinstance(link.get(k), (int, float)):
                    yield CounterMetricFamily(f"kozan_link_{k}", f"diverter link {k.replace('_', ' ')}", value=link[k])
        alarms = GaugeMetricFamily("kozan_alarms_active", "1 per active alarm", labels=["code", "severity"])
        for code, sev in s.get("alarms") or []:
            alarms.add_metric([code, sev], 1.0)
        yield alarms
        plant = s.get("plant")
        if plant is not None:
            yield GaugeMetricFamily("kozan_plant_connected", "MQTT broker connected", value=float(plant["connected"]))
            yield GaugeMetricFamily("kozan_plant_backlog_items", "item rows not yet acknowledged by the broker",
                                    value=plant["backlog"])
            yield GaugeMetricFamily("kozan_plant_acked_item_id", "last item id the broker acknowledged (contiguous)",
                                    value=plant["acked_id"])
            yield GaugeMetricFamily("kozan_plant_confirmed_item_id", "last item id the plant database confirmed",
                                    value=plant["confirmed_id"])


class MetricsServer:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 9108):
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StationCollector(snapshot))
        self.host, self.port = host, port
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> str:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as e:
            raise OSError(f"metrics endpoint: cannot listen on {self.host}:{self.port} ({e}); "
                          "set plant.metrics.port to a free port") from None
        self.port = self._server.server_address[1]
        return self.url

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def station_snapshot(station: Any, publisher: Any = None) -> dict[str, Any]:
    """What the endpoint shows for a running `station.runtime.Station` (read without locks: a scrape
    may see a counter a frame old, never a torn value)."""
    c = station.core.counters
    outcomes: dict[str, int] = {"fired": c.fired, "missed": c.missed,
                                 "manual": max(0, c.per_bin.get(0, 0) - c.missed)}   # per_bin[0] holds the missed too
    for k, n in dict(c.naks).items():
        outcomes[f"nak:{k}"] = n
    link = None
    try:
        link = station.link.health()
    except Exception:
        pass
    return {
        "per_bin": {str(b): n for b, n in dict(c.per_bin).items()}, "per_class": dict(c.per_class), "outcomes": outcomes, "frames": c.frames,
        "dropped_frames": station.mailbox.dropped, "fps": station.stats.fps,
        "latency_s_p50": station.stats.latency_ms_p50 / 1000.0, "latency_s_max": station.stats.latency_ms_max / 1000.0,
        "state": station.state.state.value, "link": link,
        "alarms": [(a.code, a.severity.value) for a in station.alarms.active()],
        "plant": publisher.stats() if publisher is not None else None,
    }
