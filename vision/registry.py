"""The model registry in `models/`: versions, model cards, the active pointer, the promotion gate.

Layout (every file beside the others in one folder):

    models/<version>.onnx         the exported detector (fixed input, Kozan metadata)
    models/<version>.pt           its ultralytics weights: what `kozan model train --from <version>` starts from
    models/<version>.card.json    model card: parent, data fingerprint, golden-set metrics, latency, notes
    models/ACTIVE.json            the pointer: {"version": ..., "history": [older active versions, newest last]}
    models/active.onnx (+ .pt)    the single-model layout of an install from before the registry: what runs
                                  while ACTIVE.json does not exist; the first promotion copies it in as its
                                  own version (the repository itself ships no such file)

`detector.model: models/active.onnx` (the default) keeps working: with an ACTIVE.json beside it,
it means "the registry's active version"; any other path is taken literally.

The gate (`check_promotion`) refuses a candidate, saying exactly why, when it does not load or has
no fixed input, names classes the sorting rules do not know (or lacks classes they sort on), loses
more than a tolerance of AP50 on any class of the golden set against the active model, loses
per-class recall at the sorting threshold (rules.min_confidence: what the sorter acts on, which
AP50 cannot see) by more than a tolerance and at least a couple of items, or is slower
than the latency budget. Last, and only when every cheaper check has passed, it can run both
models through the same simulated batch of items (`line_check`) and refuse a candidate that sends
more Li-ion items into a wrong sorted bin than the active model, or loses purity or recovery there.
The golden set judges boxes; the line judges where the items go (det-v6n-int8 lost 45 items to
det-v4's 43 over 3000 simulated items, yet sent 2 of 35 Li-ion cells to bin 2 in a battery-only run:
models/MODEL_CARD.md). onnxruntime is all this module needs; golden-set metrics come from an
evaluator (ultralytics, in the training path) and are kept in the cards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

ACTIVE_FILE = "ACTIVE.json"
LEGACY = "active.onnx"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why and what to do."""


def file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(p: Path, data: Any) -> None:
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, p)


def resolve_model_path(path: Path) -> Path:
    """`.../active.onnx` with an ACTIVE.json beside it -> the active version's file; else `path`."""
    path = Path(path)
    if path.name == LEGACY and (path.parent / ACTIVE_FILE).exists():
        return Registry(path.parent).active_path()
    return path


@dataclass
class ModelEntry:
    version: str
    onnx: Path
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def pt(self) -> Path:
        return self.onnx.with_suffix(".pt")


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)

    # ---- reading ------------------------------------------------------------------------------
    def _pointer(self) -> dict[str, Any] | None:
        p = self.root / ACTIVE_FILE
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RegistryError(f"{p} is not valid JSON ({e}); fix it or `kozan model rollback`") from None
        if not isinstance(data, dict) or not isinstance(data.get("version"), str):
            raise RegistryError(f"{p}: expected {{\"version\": ..., \"history\": [...]}}")
        return data

    def card_path(self, version: str) -> Path:
        return self.root / f"{version}.card.json"

    def card(self, version: str) -> dict[str, Any]:
        p = self.card_path(version)
        return json.loads(p.read_text()) if p.exists() else {}

    def legacy_version(self) -> str | None:
        """The version named in models/active.onnx's metadata, when the legacy file is there."""
        p = self.root / LEGACY
        if not p.exists():
            return None
        from vision.detector import model_card_meta

        return model_card_meta(p)["version"]

    def entries(self) -> list[ModelEntry]:
        out = {}
        for p in sorted(self.root.glob("*.onnx")):
            if p.name == LEGACY:
                continue
            out[p.stem] = ModelEntry(p.stem, p, self.card(p.stem))
        if not (self.root / ACTIVE_FILE).exists():
            lv = self.legacy_version()
            if lv is not None and lv not in out:
                out[lv] = ModelEntry(lv, self.root / LEGACY, self.card(lv))
        return sorted(out.values(), key=lambda e: (e.card.get("created", ""), e.version))

    def entry(self, version: str) -> ModelEntry:
        for e in self.entries():
            if e.version == version:
                return e
        known = [e.version for e in self.entries()]
        raise RegistryError(f"no model version {version!r} in {self.root} (known: {known}); "
                            f"export one there with `kozan model export ... --out {self.root}/{version}.onnx`")

    def active_version(self) -> str | None:
        ptr = self._pointer()
        return ptr["version"] if ptr else self.legacy_version()

    def active_path(self) -> Path:
        ptr = self._pointer()
        if ptr is None:
            return self.root / LEGACY
        p = self.root / f"{ptr['version']}.onnx"
        if not p.exists():
            raise RegistryError(f"{self.root / ACTIVE_FILE} names {ptr['version']}, but {p} is missing: "
                                "restore the file or `kozan model rollback`")
        return p

    def history(self) -> list[str]:
        ptr = self._pointer()
        return list(ptr.get("history", [])) if ptr else []

    # ---- writing ------------------------------------------------------------------------------
    def register(self, onnx: Path, version: str | None = None, parent: str | None = None,
                 data_fingerprint: str | None = None, data: str | None = None, notes: str = "") -> ModelEntry:
        """Card a model file in the registry folder (copied in, with its .pt, when it lies elsewhere)."""
        from vision.detector import model_card_meta

        onnx = Path(onnx)
        meta = model_card_meta(onnx)
        embedded = meta["embedded_version"]
        if version and embedded and version != embedded:
            # the station names its model from the file (at start, in records, on the HMI) and the
            # registry from the card: under two names one model's decisions could not be traced to it
            raise RegistryError(f"{onnx} names itself {embedded!r} in its metadata, not {version!r}: register it "
                                f"as {embedded!r}, or write the name into the file where it is made "
                                "(`kozan model export --version`, `kozan model quantize --version`)")
        version = version or meta["version"]
        dst = self.root / f"{version}.onnx"
        if onnx.resolve() != dst.resolve():
            if dst.exists():
                raise RegistryError(f"{dst} exists already: versions are immutable, pick another version name")
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.copy2(onnx, dst)
            if onnx.with_suffix(".pt").exists():
                shutil.copy2(onnx.with_suffix(".pt"), dst.with_suffix(".pt"))
        card = self.card(version)
        card.update({
            "version": version, "file": dst.name, "sha256": file_sha256(dst),
            "weights": dst.with_suffix(".pt").name if dst.with_suffix(".pt").exists() else None,
            "names": meta["names"], "input_hw": meta["input_hw"],
            "data_fingerprint": data_fingerprint or meta["data_fingerprint"],
            "parent": parent if parent is not None else card.get("parent"),
            "created": card.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        if data:
            card["data"] = data
        if notes:
            card["notes"] = notes
        card.setdefault("golden", {})
        _write_json(self.card_path(version), card)
        return ModelEntry(version, dst, card)

    def record_metrics(self, version: str, golden_fingerprint: str, metrics: dict[str, Any]) -> None:
        card = self.card(version)
        if not card:
            raise RegistryError(f"{version} has no model card: `kozan model register` it first")
        card.setdefault("golden", {})[golden_fingerprint] = metrics
        _write_json(self.card_path(version), card)

    def _adopt_legacy(self) -> str | None:
        """Before the first pointer is written: make the legacy active.onnx a version of its own."""
        if (self.root / ACTIVE_FILE).exists():
            return self.active_version()
        lv = self.legacy_version()
        if lv is None:
            return None
        if not (self.root / f"{lv}.onnx").exists():
            self.register(self.root / LEGACY, lv, notes="adopted from the legacy models/active.onnx")
        elif not self.card(lv):
            self.register(self.root / f"{lv}.onnx", lv)
        return lv

    def set_active(self, version: str, reason: str) -> dict[str, Any]:
        prev = self._adopt_legacy()
        self.entry(version)   # exists?
        ptr = self._pointer() or {"version": prev, "history": []}
        hist = list(ptr.get("history", []))
        if prev is not None and prev != version:
            hist.append(prev)
        new = {"version": version, "history": hist[-20:], "changed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "reason": reason}
        _write_json(self.root / ACTIVE_FILE, new)
        return new

    def rollback(self) -> tuple[str, str]:
        """Back to the version active before this one; returns (from, to)."""
        ptr = self._pointer()
        if ptr is None or not ptr.get("history"):
            raise RegistryError("nothing to roll back to: no earlier active version is on record")
        hist = list(ptr["history"])
        to = hist.pop()
        p = self.root / f"{to}.onnx"
        if not p.exists():
            raise RegistryError(f"cannot roll back to {to}: {p} is missing")
        from vision.detector import model_card_meta

        model_card_meta(p)   # loads?
        cur = ptr["version"]
        _write_json(self.root / ACTIVE_FILE, {"version": to, "history": hist,
                                              "changed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "reason": f"rollback from {cur}", "rolled_back": cur})
        return cur, to


# ---- loading for the station (hot-swap) ---------------------------------------------------------
def load_for_station(path: Path, expect_names: tuple[str, ...], taxonomy_names: tuple[str, ...],
                     frame_hw: tuple[int, int], **detector_kw: Any):
    """Load a model and prove it can run on this station, or raise `ModelError` saying why.

    Loads (a corrupt file fails here), fixed NCHW 3-channel input (a dynamic or odd shape fails),
    class names the taxonomy knows and equal to the running model's, and one inference on a
    frame-sized image giving a well-formed result.
    """
    from vision.detector import Detector, ModelError

    det = Detector(path, **detector_kw)
    n, c, h, w = det.session.get_inputs()[0].shape
    if n != 1 or c != 3:
        raise ModelError(f"{path}: input shape {[n, c, h, w]}: Kozan feeds one 3-channel image (1, 3, H, W)")
    unknown = [x for x in det.names if x not in taxonomy_names]
    if unknown:
        raise ModelError(f"{path}: classes {unknown} are not in the taxonomy: the sorting rules cannot act on them")
    if tuple(det.names) != tuple(expect_names):
        raise ModelError(f"{path}: classes {list(det.names)} differ from the running model's {list(expect_names)}; "
                         "a running station only switches between models with the same classes — restart it")
    try:
        out = det(np.full((frame_hw[0], frame_hw[1], 3), 114, np.uint8))
    except Exception as e:
        raise ModelError(f"{path}: a test inference failed ({type(e).__name__}: {e})") from None
    if out.boxes.shape[1:] != (4,):
        raise ModelError(f"{path}: a test inference gave boxes of shape {out.boxes.shape}")
    return det


def measure_latency_ms(path: Path, runs: int = 15, threads: int = 2) -> float:
    """Median session.run time of a model on its own input (letterboxing excluded), in ms."""
    from vision.detector import make_session

    sess = make_session(path, threads)
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(0).random(inp.shape, dtype=np.float32)
    sess.run(None, {inp.name: x})
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {inp.name: x})
        ts.append((time.perf_counter() - t0) * 1000)
    return statistics.median(ts)


# ---- the gate -------------------------------------------------------------------------------------
def _golden_metrics(reg: "Registry", version: str | None, path: Path, fingerprint: str,
                    evaluate: Callable[[Path], dict[str, Any]] | None, operating_conf: float | None) -> dict | None:
    """A version's metrics on the golden set: from its card, else evaluated now (and carded).

    Cached metrics taken at another operating threshold (or before the gate compared one) are
    evaluated again rather than compared across thresholds.
    """
    card = reg.card(version) if version else {}
    m = card.get("golden", {}).get(fingerprint)
    stale = m is not None and operating_conf is not None and m.get("operating_conf") != operating_conf
    if (m is None or stale) and evaluate is not None and path.exists():
        m = evaluate(path)
        if card:
            reg.record_metrics(version, fingerprint, m)
    return m


def _side_by_side(cand: dict[str, float | None], active: dict[str, float | None]) -> dict[str, dict]:
    return {cls: {"candidate": cand.get(cls), "active": a} for cls, a in sorted(active.items())}


def _regressions(cand: dict[str, float | None], active: dict[str, float | None], what: str,
                 tolerance: float) -> list[str]:
    """Each class the candidate is worse on than the active model by more than `tolerance`."""
    worse = []
    for cls, a in sorted(active.items()):
        if a is None:             # no instance of the class in the golden set: nothing to compare
            continue
        c = cand.get(cls)
        if c is None:
            worse.append(f"{cls} (no {what} for it; active {a:.3f})")
        elif c < a - tolerance:
            worse.append(f"{cls} {what} {c:.3f} < active {a:.3f} - tolerance {tolerance:.3f}")
    return worse


def _operating_point(cm: dict, am: dict, conf: float, tolerance: float, min_items: int,
                     details: dict) -> list[str]:
    """Refusals for per-class recall lost at the sorting threshold (none: it may pass).

    Recall only: precision is already in AP50 over the whole ranking, and a single-frame false
    detection at the threshold rarely becomes a sorted item (a track needs several views), so
    precision at one threshold on a few frames judges sorting worse than AP50 does. A golden set
    cut from a line's captures holds a handful of each class, where one item moves a class's recall
    by 0.1–0.3: a loss counts only when it is beyond `tolerance` and at least `min_items` items.
    """
    if "per_class_recall" not in cm or "per_class_recall" not in am:
        return [f"no per-class recall at the sorting threshold {conf} on the golden set "
                "(evaluate with vision.evaluation)"]
    c, a = cm["per_class_recall"], am["per_class_recall"]
    details[f"per_class_recall@{conf}"] = _side_by_side(c, a)
    worse = []
    for line in _regressions(c, a, "recall", tolerance):
        cls = line.split(" ", 1)[0]
        nc, na = cm.get("per_class_tp", {}).get(cls), am.get("per_class_tp", {}).get(cls)
        lost = None if nc is None or na is None else na - nc
        if lost is not None and lost < min_items:
            continue              # within what one item does to a handful: not a regression
        worse.append(line + ("" if lost is None else f" ({lost} item{'s' if lost != 1 else ''} fewer)"))
    if worse:
        return [f"per-class recall at the sorting threshold {conf} fell on the golden set: " + "; ".join(worse)]
    return []



@dataclass
class GateResult:
    version: str
    ok: bool
    refusals: list[str]
    details: dict[str, Any]

    def explain(self) -> str:
        if self.ok:
            return f"{self.version}: passes the gate ({json.dumps(self.details, sort_keys=True)})"
        return f"{self.version} refused:\n" + "\n".join(f"  - {r}" for r in self.refusals)


def check_promotion(reg: Registry, version: str, sorting_classes: list[str], taxonomy_names: tuple[str, ...],
                    golden_fingerprint: str | None, ap50_tolerance: float, latency_budget_ms: float,
                    evaluate: Callable[[Path], dict[str, Any]] | None = None,
                    latency: Callable[[Path], float] = measure_latency_ms,
                    operating_conf: float | None = None, recall_tolerance: float = 0.05,
                    min_items: int = 2, line_check: Callable[[Path], dict[str, Any]] | None = None,
                    line_tolerance: float = 0.01) -> GateResult:
    """Every reason `version` may not replace the active model (an empty list: it may).

    AP50 integrates over every confidence, so it cannot see a model whose scores sink below the
    threshold the sorter acts on: such a model ranks its boxes as well as before (same AP50) and
    sends the items to manual. With `operating_conf` (the rules' `min_confidence`) the gate also
    compares per-class recall at that threshold on the golden set — what sorting sees.
    """
    from vision.detector import ModelError, model_card_meta

    refusals: list[str] = []
    details: dict[str, Any] = {}
    cand = reg.entry(version)
    try:
        meta = model_card_meta(cand.onnx)
    except ModelError as e:
        return GateResult(version, False, [f"does not load: {e}"], details)
    names = meta["names"]
    unknown = [n for n in names if n not in taxonomy_names]
    if unknown:
        refusals.append(f"classes {unknown} are unknown to the sorting rules (taxonomy: {list(taxonomy_names)})")
    missing = [n for n in sorting_classes if n not in names]
    if missing:
        refusals.append(f"does not detect {missing}, which the sorting rules sort (rules.class_to_bin)")
    active_v = reg.active_version()
    active_path = reg.active_path()
    if active_v == version:
        refusals.append(f"{version} is already the active model")
    active_names = model_card_meta(active_path)["names"] if active_path.exists() else None
    if active_names is not None and list(active_names) != list(names):
        refusals.append(f"classes {names} differ from the active model's {active_names}: a running station "
                        "cannot switch to it (retrain with the taxonomy's classes)")
    # golden set: per-class AP50 against the active model, on the same golden set
    if golden_fingerprint is None:
        refusals.append("no golden set given (--golden data.yaml): per-class AP50 cannot be compared")
    else:
        got = {v: _golden_metrics(reg, v, path, golden_fingerprint, evaluate, operating_conf)
               for v, path in ((version, cand.onnx), (active_v, active_path))}
        cm, am = got.get(version), got.get(active_v)
        if cm is None:
            refusals.append(f"{version} has no metrics on golden set {golden_fingerprint}: evaluate it first")
        if am is None and active_v is not None:
            refusals.append(f"the active model {active_v} has no metrics on golden set {golden_fingerprint}")
        if cm is not None and am is not None:
            details["map50"] = {"candidate": cm.get("map50"), "active": am.get("map50")}
            worse = _regressions(cm["per_class_ap50"], am["per_class_ap50"], "AP50", ap50_tolerance)
            if worse:
                refusals.append("per-class AP50 regression on the golden set: " + "; ".join(worse))
            details["per_class_ap50"] = _side_by_side(cm["per_class_ap50"], am["per_class_ap50"])
            if operating_conf is not None:
                refusals += _operating_point(cm, am, operating_conf, recall_tolerance, min_items, details)
    ms = latency(cand.onnx)
    details["latency_ms"] = round(ms, 2)
    if ms > latency_budget_ms:
        refusals.append(f"inference takes {ms:.1f} ms (median), over the budget of {latency_budget_ms:.1f} ms")
    if line_check is not None and not refusals and active_v is not None:
        # minutes of simulation each: spent only on a candidate that passed everything cheaper
        cl, al = line_check(cand.onnx), line_check(active_path)
        details["line"] = {"candidate": cl, "active": al}
        refusals += _line_regressions(cl, al, line_tolerance)
    return GateResult(version, not refusals, refusals, details)


def _line_regressions(cand: dict[str, Any], active: dict[str, Any], tolerance: float) -> list[str]:
    """Refusals from the simulated batch both models sorted (none: it may pass).

    A Li-ion item in any sorted bin but its own is a fire in the plant that buys that bin, so the
    candidate may not misroute a single one more than the active model does; purity and recovery
    may each fall by at most `tolerance` (one batch of a few hundred items: ±1 item is 0.005).
    """
    out = []
    if cand["li_ion_misrouted"] > active["li_ion_misrouted"]:
        out.append(f"{cand['li_ion_misrouted']} Li-ion item(s) of {cand['li_ion_items']} went to a wrong sorted bin "
                   f"on the simulated line ({cand['li_ion_misrouted_to']}), against {active['li_ion_misrouted']} "
                   "with the active model: a fire hazard")
    for what in ("purity", "recovery"):
        c, a = cand.get(what), active.get(what)
        if c is not None and a is not None and c < a - tolerance:
            out.append(f"{what} on the simulated line {c:.4f} < active {a:.4f} - tolerance {tolerance:.3f} "
                       f"({cand['items']} items, seed {cand['seed']})")
    return out
