"""Fixtures for the records tests: item records as the core writes them."""
from __future__ import annotations

import json

import pytest

from station.records import ItemRecord


def item(track_id: int, cls: str = "board_high", bin_: int = 3, command_id: int | None = None,
         outcome: str | None = None, confidence: float = 0.9, votes: dict[str, float] | None = None,
         reason: str = "rule") -> ItemRecord:
    if outcome is None:
        outcome = "manual" if bin_ == 0 else "sent"
    return ItemRecord(track_id=track_id, first_seen_s=1.0 + track_id, decided_s=2.0 + track_id, class_name=cls,
                      confidence=confidence, votes=votes or {cls: 9.0 * confidence, "board_low": 9.0 * (1 - confidence)},
                      views=9, bin=bin_, diverter_id=bin_ or None, reason=reason,
                      command_id=command_id if bin_ else None, fire_count=1000 + track_id if bin_ else None,
                      outcome=outcome, model_version="det-test", u_mm=0.5, y_mm=100.25, length_mm=60.0,
                      width_mm=40.0)


def dumps(x) -> str:
    return json.dumps(x, sort_keys=True)


@pytest.fixture
def make_item():
    return item
