"""The station's Prometheus endpoint: served on loopback, parsed back with prometheus_client's parser."""
from __future__ import annotations

import urllib.request
from collections import Counter
from types import SimpleNamespace

import pytest

from station.alarms import AlarmBoard, Severity
from station.config import ConfigError, config_from_dict
from station.core import Counters

pytest.importorskip("prometheus_client")


def fake_station() -> SimpleNamespace:
    """The attributes of station.runtime.Station that the snapshot reads, with known values."""
    alarms = AlarmBoard()
    alarms.raise_("missed_item", Severity.WARNING, "item 7 missed", item_id=7)
    c = Counters(frames=900, decided=42, per_bin=Counter({0: 5, 1: 20, 3: 17}),
                 per_class=Counter({"li_ion_cell": 20, "board_high": 17, "alkaline": 5}), fired=35, missed=2,
                 naks=Counter({"LATE": 1}))
    return SimpleNamespace(
        core=SimpleNamespace(counters=c), mailbox=SimpleNamespace(dropped=12),
        stats=SimpleNamespace(fps=29.5, latency_ms_p50=41.0, latency_ms_max=90.0),
        state=SimpleNamespace(state=SimpleNamespace(value="running")), alarms=alarms,
        link=SimpleNamespace(health=lambda: {"rtt_ms": 2.5, "retries": 3, "timeouts": 0, "resyncs": 1,
                                             "crc_errors": 0, "resets": 0, "io_error": None}))


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_serves_the_station_on_loopback():
    from station.plant.metrics import MetricsServer, station_snapshot

    st = fake_station()
    plant = SimpleNamespace(stats=lambda: {"connected": True, "acked_id": 40, "confirmed_id": 38, "backlog": 2})
    srv = MetricsServer(lambda: station_snapshot(st, plant), "127.0.0.1", 0)
    url = srv.start()
    try:
        assert url.startswith("http://127.0.0.1:")
        m = scrape(url)
        assert m[("kozan_items_bin_total", (("bin", "1"),))] == 20
        assert m[("kozan_items_bin_total", (("bin", "0"),))] == 5
        assert m[("kozan_items_class_total", (("class", "board_high"),))] == 17
        assert m[("kozan_items_outcome_total", (("outcome", "fired"),))] == 35
        assert m[("kozan_items_outcome_total", (("outcome", "manual"),))] == 3   # bin 0 less the 2 missed
        assert m[("kozan_items_outcome_total", (("outcome", "nak:LATE"),))] == 1
        assert m[("kozan_frames_dropped_total", ())] == 12
        assert m[("kozan_loop_fps", ())] == 29.5
        assert m[("kozan_loop_latency_seconds", (("quantile", "0.5"),))] == pytest.approx(0.041)
        assert m[("kozan_line_state", (("state", "running"),))] == 1
        assert m[("kozan_line_state", (("state", "fault"),))] == 0
        assert m[("kozan_link_up", ())] == 1
        assert m[("kozan_link_rtt_seconds", ())] == pytest.approx(0.0025)
        assert m[("kozan_link_retries_total", ())] == 3
        assert m[("kozan_alarms_active", (("code", "missed_item"), ("severity", "warning")))] == 1
        assert m[("kozan_plant_backlog_items", ())] == 2
        assert m[("kozan_plant_confirmed_item_id", ())] == 38
        st.core.counters.per_bin[1] += 1                  # read at scrape time
        assert scrape(url)[("kozan_items_bin_total", (("bin", "1"),))] == 21
    finally:
        srv.stop()


def test_plant_config_is_validated_and_off_by_default():
    cfg = config_from_dict({})
    assert not cfg.plant.mqtt.enabled and not cfg.plant.metrics.enabled
    assert cfg.plant.metrics.host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"plant.station_id = 'line/7'"):
        config_from_dict({"plant": {"station_id": "line/7"}})
    with pytest.raises(ConfigError, match=r"plant.mqtt.port"):
        config_from_dict({"plant": {"mqtt": {"port": 0}}})
