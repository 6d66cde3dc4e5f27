"""`kozan firmware ports|ping|status|fire N` against the firmware simulator on a real pty (`--port sim`)."""

from __future__ import annotations

import json

import pytest

from station.cli import main


def test_ports_lists_serial_ports_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["firmware", "ports", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list)
    assert all({"device", "description", "hwid", "likely_mcu"} <= set(r) for r in rows)


def test_ping_gives_round_trip_statistics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["firmware", "ping", "--port", "sim", "-n", "5", "--interval", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answered"] == 5 and out["lost"] == 0
    assert 0 < out["rtt_ms"]["min"] <= out["rtt_ms"]["median"] <= out["rtt_ms"]["max"]


def test_status_reports_hello_and_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["firmware", "status", "--port", "sim", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocol"] == 3 and out["firmware"] == "3.0" and not out["configured"]
    assert out["status"] is not None and out["status"]["queue_depth"] == 0 and not out["status"]["estop"]
    assert out["status"]["armed"] and not out["status"]["belt_running"]
    # the simulated belt runs at the configured speed; `status` measures it from the encoder reports
    assert out["belt_counts_per_s"] == pytest.approx(5000.0, rel=0.05)  # 500 mm/s at 0.1 mm per count


def test_fire_asks_first_and_fires_when_confirmed(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert main(["firmware", "fire", "1", "--port", "sim"]) == 1
    assert "not fired" in capsys.readouterr().out
    assert main(["firmware", "fire", "1", "--port", "sim", "--yes", "--pulse-ms", "20"]) == 0
    assert "fired diverter 1 at belt count" in capsys.readouterr().out
