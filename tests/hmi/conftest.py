"""Fixtures for the HMI tests: a real station on the simulated line, in real time, with its HMI.

The station uses the default configuration (the shipped model `models/active.onnx`). Only while
that model is being trained can a developer point `KOZAN_HMI_TEST_MODEL` at another ONNX file;
CI never sets it.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from station.config import StationConfig, config_from_dict

REPO = Path(__file__).resolve().parents[2]


def test_model_override() -> list[str]:
    """`--set` arguments for `kozan run` (empty in CI: the shipped model)."""
    m = os.environ.get("KOZAN_HMI_TEST_MODEL")
    return ["--set", f"detector.model={m}"] if m else []


test_model_override.__test__ = False  # a helper, not a test


def make_config(**sections: dict[str, Any]) -> StationConfig:
    data: dict[str, Any] = {k: dict(v) for k, v in sections.items()}
    m = os.environ.get("KOZAN_HMI_TEST_MODEL")
    if m:
        data.setdefault("detector", {})["model"] = m
    data.setdefault("hmi", {}).setdefault("port", 0)
    return config_from_dict(data, "hmi test")


def wait_for(pred: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll until `pred()` is truthy; the failure names what never happened."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real-time station (simulated line) shared by a module's API tests; stopped at the end."""
    from station.runtime import Station

    tmp = tmp_path_factory.mktemp("station")
    cfg = make_config(sim={"items_per_min": 300})
    st = Station(cfg, records_path=str(tmp / "records.sqlite"))
    st.start()
    try:
        yield st
    finally:
        st.stop()
