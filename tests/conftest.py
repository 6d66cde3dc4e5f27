"""Shared fixtures. Tests run on the simulated line and the shipped model; never the network."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    from station.config import StationConfig
    from vision.registry import resolve_model_path

    # what the station loads: `models/active.onnx` means the registry's active version
    p = resolve_model_path(StationConfig().resolve(StationConfig().detector.model))
    assert p.exists(), f"the shipped model {p} is missing"
    return p
