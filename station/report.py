"""Sorting quality of a simulated run, judged from ground truth.

Purity of a bin: of the items that landed in it, the share that belong there. Recovery of a bin:
of the items that belong in it, the share that landed there. Overall figures pool the sorted
bins (1..n); the manual path is reported on its own, since sending an item there is the safe
answer to doubt, not a sorting error.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Iterable

import numpy as np

from station.config import MANUAL_BIN, StationConfig
from station.simline.world import SimItem
from vision.taxonomy import load_taxonomy


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def sorting_report(items: Iterable[SimItem], cfg: StationConfig) -> dict[str, Any]:
    items = list(items)
    in_bin: Counter = Counter()
    correct: Counter = Counter()
    expected: Counter = Counter()
    per_class: dict[str, Counter] = defaultdict(Counter)
    errors = []
    for it in items:
        b = MANUAL_BIN if it.bin is None else it.bin
        in_bin[b] += 1
        expected[it.expected_bin] += 1
        if b == it.expected_bin:
            correct[b] += 1
        per_class[it.truth][str(b)] += 1
        if it.fire_error_mm is not None:
            errors.append(abs(it.fire_error_mm))
    sorted_bins = sorted({d.bin for d in cfg.diverters})
    per_bin = {}
    for b in [MANUAL_BIN] + sorted_bins:
        per_bin[str(b)] = {
            "name": cfg.rules.bin_names.get(b, f"bin {b}"), "items": in_bin[b], "correct": correct[b],
            "expected": expected[b], "purity": _ratio(correct[b], in_bin[b]),
            "recovery": _ratio(correct[b], expected[b]),
        }
    n_sorted = sum(in_bin[b] for b in sorted_bins)
    n_correct = sum(correct[b] for b in sorted_bins)
    n_expected = sum(expected[b] for b in sorted_bins)
    err = np.asarray(errors) if errors else np.zeros(1)
    return {
        "items": len(items),
        "purity": _ratio(n_correct, n_sorted),
        "recovery": _ratio(n_correct, n_expected),
        "per_bin": per_bin,
        "per_class": {k: {"count": sum(v.values()), "bins": dict(sorted(v.items()))}
                      for k, v in sorted(per_class.items())},
        "fire_error_mm": {"p50": round(float(np.percentile(err, 50)), 2),
                          "p99": round(float(np.percentile(err, 99)), 2), "n": len(errors)},
    }


def line_verdict(rep: dict[str, Any], cfg: StationConfig) -> dict[str, Any]:
    """What the promotion gate compares from a simulated batch: purity, recovery, and every Li-ion
    item that landed in a sorted bin other than its own (the manual path is safe, not misrouted)."""
    li_ion = {c.name for c in load_taxonomy().classes if c.is_li_ion}
    to: Counter = Counter()
    n_li = 0
    for truth, row in rep["per_class"].items():
        if truth not in li_ion:
            continue
        n_li += row["count"]
        own = cfg.rules.class_to_bin.get(truth, MANUAL_BIN)
        for b, n in row["bins"].items():
            if int(b) not in (MANUAL_BIN, own):
                to[f"bin {b}"] += n
    return {"items": rep["items"], "seed": rep.get("seed"), "model_version": rep.get("model_version"),
            "purity": rep["purity"], "recovery": rep["recovery"],
            "li_ion_items": n_li, "li_ion_misrouted": sum(to.values()), "li_ion_misrouted_to": dict(sorted(to.items()))}
