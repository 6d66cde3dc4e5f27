"""The loop, end to end: line → capture → labels → fine-tune → gate → hot-swap → the line again.

At CI scale, on the simulated line in virtual time:
  1. the station runs the shipped model on a stream of items under one station's look and
     captures what the model was unsure of (and a random sample);
  2. a labeller corrects the pre-labels — here from the simulator's ground truth, through the
     same CVAT export/import a person would use;
  3. the station's model is fine-tuned briefly on the corrected frames (ultralytics): backbone
     frozen, no mosaic (it shrinks a line frame's small cells further), one optimiser step per
     batch (ultralytics would otherwise accumulate to 64 images: one step an epoch on this data);
  4. the result is exported, carded in a registry, and promoted through the gate (golden set:
     held-out captured frames, per-class AP50 against the active model);
  5. a new stream of items (never seen in training) runs twice under the same look: once with
     the old model, once hot-swapping to the promoted model in the background as the run starts.
Purity and recovery of both runs are printed. What the test can hold at CI scale is in the test's
docstring: the improvement itself is measured (docs/loop.md), not yet guaranteed.

The station starts on det-v1, the first shipped version (kept in the registry as the active
model's ancestor): it was trained only on randomised synthetic scenes, and on this line's look it
recovers about half the items it should. That domain gap is exactly what a station's own frames
close, so the test needs no artificial handicap. (det-v3 and det-v4 already saw line-look scenes
in training and sort this look's 40 items perfectly: nothing would be left to show.) Measured
while tuning this recipe (150 items collected): a 6-epoch fine-tune with default accumulation left the
model unchanged; mosaic at lr0 0.01 promoted a model that sorted worse (recovery 0.55 -> 0.45);
frozen backbone + no mosaic, 15 epochs: recovery 0.55 -> 0.82 (each of these runs captured a
different draw of frames; see the test's docstring for how much that matters). Run
`python -m tests.loop.test_loop_closes --items 300 --epochs 25 --eval-items 100` for
a larger experiment than CI's.
"""
from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LOOK = 3          # one station's camera look (belt, light, lens), the same in every run
COLLECT_SEED, EVAL_SEED = 101, 202


def label_from_truth(exported_zip: Path, collected: Path, out_zip: Path) -> int:
    """The labeller: open the CVAT export, replace each frame's boxes with the true ones, save."""
    from vision.dataset_tools import captures
    from vision.taxonomy import load_taxonomy

    names = load_taxonomy().names
    truth = {c["name"]: c["meta"] for c in captures(collected)}
    n = 0
    with zipfile.ZipFile(exported_zip) as zin, zipfile.ZipFile(out_zip, "w") as zout:
        for f in zin.namelist():
            data = zin.read(f)
            stem = Path(f).stem
            if f.startswith("obj_train_data/") and f.endswith(".txt") and stem in truth:
                m = truth[stem]
                W, H = m["width"], m["height"]
                rows = [f"{names.index(c)} {(x0 + x1) / 2 / W:.6f} {(y0 + y1) / 2 / H:.6f} "
                        f"{(x1 - x0) / W:.6f} {(y1 - y0) / H:.6f}\n" for c, x0, y0, x1, y1 in m["sim_truth"]]
                data = "".join(rows).encode()
                n += 1
            zout.writestr(f, data)
    return n


class BackgroundSwap:
    """Hot-swap during a run: at frame `at`, load + validate the model in a thread, offer it to the core."""

    def __init__(self, path: Path, version: str, at: int = 1):
        self.path, self.version, self.at = path, version, at
        self.rec: dict[str, Any] = {}

    def _load(self, core: Any) -> None:
        from vision.registry import load_for_station
        from vision.taxonomy import load_taxonomy

        t0 = time.perf_counter()
        f0 = core.counters.frames
        det = load_for_station(self.path, tuple(core.detector.names), tuple(load_taxonomy().names), (720, 1280))
        self.rec.update(load_s=round(time.perf_counter() - t0, 3), frames_while_loading=core.counters.frames - f0)
        core.offer_detector(det, self.version)

    def __call__(self, k: int, core: Any) -> None:
        if k == self.at:
            self.thread = threading.Thread(target=self._load, args=(core,), daemon=True)
            self.thread.start()


def close_the_loop(work: Path, n_collect: int, n_eval: int, epochs: int, tolerance: float = 0.10,
                   start_from: str = "det-v1", lr0: float = 0.001, freeze: int = 10, log=print) -> dict[str, Any]:
    from station.cli_loop import golden_fingerprint, golden_metrics
    from station.config import StationConfig
    from station.simrun import run_fast
    from vision import dataset_tools as dt
    from vision.registry import Registry, check_promotion
    from vision.taxonomy import load_taxonomy
    from vision.training import TrainRecipe, export_onnx, train

    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(what: str, t0: float) -> None:
        timings[what] = round(time.perf_counter() - t0, 1)
        log(f"[loop] {what}: {timings[what]} s")

    models = work / "models"
    models.mkdir(parents=True)
    shipped = Registry(REPO / "models").entry(start_from).onnx      # laid out as a station's first
    for ext in (".onnx", ".pt"):                                    # install: a lone active.onnx
        shutil.copy2(shipped.with_suffix(ext), models / f"active{ext}")
    reg = Registry(models)
    base = reg.active_version()
    from vision.detector import model_card_meta

    hw = tuple(model_card_meta(models / "active.onnx")["input_hw"])   # fine-tune and export at the model's own input
    reg.set_active(base, "the shipped model")                       # adopt it: models/<base>.onnx + .pt + card
    cfg = StationConfig()
    cfg.detector.model = str(models / "active.onnx")                # the pointer: follows promotions
    cfg.capture.random_rate = 0.5                                   # CI scale: a big sample of the rest too
    cfg.capture.max_per_min = 600

    # 1. the line with the shipped model, capturing
    t0 = time.perf_counter()
    collected = work / "collected"
    rep_c = run_fast(cfg, n_collect, seed=COLLECT_SEED, look_seed=LOOK, capture_dir=collected)
    lap("collect run", t0)
    cap = rep_c["capture"]
    line_h = rep_c["line_s"] / 3600
    stats = dt.stats(collected)
    disk_mb = sum(p.stat().st_size for p in collected.rglob("*") if p.is_file()) / 1e6

    # 2. label: CVAT export -> corrected from the simulator's truth -> import
    t0 = time.perf_counter()
    exported, fixed = work / "cvat.zip", work / "cvat-fixed.zip"
    dt.export_cvat(collected, exported)
    n_fixed = label_from_truth(exported, collected, fixed)
    imported = dt.import_labels(collected, fixed)
    assert imported["imported"] == n_fixed == stats["frames"]
    dedup = dt.dedupe(collected)
    # 3. data: collected frames only (the line's look); the test split, never trained or selected on,
    #    is the golden set (CI scale: a dozen frames, hence the gate's wider AP50 tolerance below)
    split = dt.split(collected, val=0.2, test=0.25, seed=0, only_human=True)
    golden = collected / "data.yaml"
    merged = dt.merge([collected], work / "train-set")
    lap("label + split", t0)

    # 4. fine-tune the active model's weights briefly, export, card
    t0 = time.perf_counter()
    run = train(TrainRecipe(data=work / "train-set" / "data.yaml", model=str(reg.entry(base).pt), imgsz=max(hw),
                            epochs=epochs, batch=16, nbs=16, workers=0, threads=2, name="ft", project=work / "runs",
                            warmup_epochs=0.0, close_mosaic=epochs, lr0=lr0, patience=epochs, freeze=freeze))
    lap("fine-tune", t0)
    t0 = time.perf_counter()
    cand = f"{base}-line1"
    export_onnx(run / "weights" / "best.pt", work / "export" / f"{cand}.onnx", hw, cand,
                merged["fingerprint"])
    reg.register(work / "export" / f"{cand}.onnx", cand, parent=base, data_fingerprint=merged["fingerprint"],
                 data=str(work / "train-set" / "data.yaml"))
    lap("export + register", t0)

    # 5. the gate, then promotion
    t0 = time.perf_counter()
    rules = sorted(n for n, b in cfg.rules.class_to_bin.items() if b != 0)
    gate = check_promotion(reg, cand, rules, tuple(load_taxonomy().names), golden_fingerprint(golden), tolerance,
                           latency_budget_ms=1000.0, evaluate=lambda p: golden_metrics(p, golden))
    log(gate.explain())
    lap("gate", t0)
    if gate.ok:
        reg.set_active(cand, "promoted by the loop test")

    # 6. new items, same look: the old model, then the promoted one hot-swapped in as the run starts
    t0 = time.perf_counter()
    cfg_old = cfg.model_copy(deep=True)
    cfg_old.detector.model = str(models / f"{base}.onnx")
    cfg_default_capture = cfg_old.model_copy(deep=True)
    cfg_default_capture.capture = type(cfg.capture)(enabled=True)      # the shipped capture settings
    before = run_fast(cfg_default_capture, n_eval, seed=EVAL_SEED, look_seed=LOOK, capture_dir=work / "default-capture")
    lap("before run (default capture settings)", t0)
    bc = before["capture"]
    default_mb = sum(p.stat().st_size for p in (work / "default-capture").rglob("*") if p.is_file()) / 1e6
    t0 = time.perf_counter()
    swap = BackgroundSwap(reg.active_path(), reg.active_version())
    after = run_fast(cfg_old, n_eval, seed=EVAL_SEED, look_seed=LOOK, on_frame=swap)
    swap.thread.join(30)
    lap("after run (hot-swap)", t0)
    sw = after["swaps"][0] if after["swaps"] else None

    out = {
        "base": base, "candidate": cand, "promoted": gate.ok, "gate": gate.details, "refusals": gate.refusals,
        "before": {k: before[k] for k in ("purity", "recovery", "items", "missed")},
        "after": {k: after[k] for k in ("purity", "recovery", "items", "missed")},
        "per_bin_before": {b: (v["purity"], v["recovery"]) for b, v in before["per_bin"].items()},
        "per_bin_after": {b: (v["purity"], v["recovery"]) for b, v in after["per_bin"].items()},
        "capture": {**cap, "line_s": rep_c["line_s"], "frames_per_line_hour": round(cap["written"] / line_h),
                    "mb_per_line_hour": round(disk_mb / line_h, 1), "per_reason": stats["per_reason"],
                    "duplicates_removed": dedup["duplicates"]},
        "capture_default_settings": {**bc, "line_s": before["line_s"],
                                     "frames_per_line_hour": round(bc["written"] / (before["line_s"] / 3600)),
                                     "mb_per_line_hour": round(default_mb / (before["line_s"] / 3600), 1)},
        "data": {"split": split, "train": merged["n_train"], "val": merged["n_val"]},
        "hot_swap": {**swap.rec, "switched_at_frame": sw and sw["frame"],
                     "tracks_in_flight": sw and sw["tracks_in_flight"],
                     "frames_rendered": after["frames_rendered"], "frames_processed": after["frames"],
                     "frames_missed": after["frames_rendered"] - after["frames"]},
        "timings_s": {**timings, "total": round(time.perf_counter() - t_start, 1)},
    }
    log("[loop] " + json.dumps(out, indent=1, default=str))
    return out


@pytest.mark.slow
def test_the_loop_runs_end_to_end_through_the_gate_and_a_hot_swap(tmp_path):
    """Every step of the loop, for real, and each branch of the gate held to what it must do.

    What the test holds: a promoted model reaches the running line by a hot-swap that misses no
    frame, and on this run's 40 new items the line is no worse (within an item or two); a refused
    model leaves the line as it was, refused for golden-set AP only.

    What it does NOT prove: that the loop improves the line at CI scale. With this recipe (lr0 0.001,
    backbone frozen) the fine-tune is promoted (golden mAP50 0.736 -> 0.748) and sorts these 40 items
    better (purity 0.92 -> 0.96, recovery 0.605 -> 0.632), but 100 new items worse (purity 0.951 ->
    0.892, recovery 0.630 both): golden-set AP50 on ~36 frames does not judge sorting. At lr0 0.005
    the gate refused it (every class's AP50 fell). docs/loop.md has the runs.
    """
    pytest.importorskip("ultralytics", reason="the loop test fine-tunes: it needs the 'train' extra (make test installs it)")
    r = close_the_loop(tmp_path, n_collect=150, n_eval=40, epochs=15)
    print(f"\npromoted: {r['promoted']} {r['refusals']}\nbefore: purity {r['before']['purity']} recovery "
          f"{r['before']['recovery']}   after: purity {r['after']['purity']} recovery {r['after']['recovery']}   "
          f"(items {r['after']['items']}; hot-swap {r['hot_swap']})")
    cap = r["capture"]
    assert cap["written"] >= 50 and cap["failed"] == 0 and cap["stopped"] is None
    assert r["data"]["train"] >= 30 and r["data"]["split"]["test"] >= 10
    # the hot-swap in the second run (to the promoted model, or to the same active one) misses no frame
    assert r["hot_swap"]["frames_missed"] == 0 and r["hot_swap"]["switched_at_frame"] is not None
    if r["promoted"]:
        # on ~38 items one item moves a figure by ~0.03
        assert r["after"]["recovery"] >= r["before"]["recovery"] - 0.03
        assert r["after"]["purity"] >= r["before"]["purity"] - 0.05
    else:
        # refused for quality on the golden set (not for a broken file or classes), and the line kept its model
        assert r["refusals"] and all(x.startswith("per-class AP50 regression on the golden set")
                                      for x in r["refusals"]), r["refusals"]
        assert r["after"] == r["before"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=150)
    ap.add_argument("--eval-items", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--work", default=None)
    ap.add_argument("--start-from", default="det-v1", help="registry version the station runs first")
    ap.add_argument("--lr0", type=float, default=0.001)
    ap.add_argument("--freeze", type=int, default=10, help="layers kept as they are (10: the backbone; 0: none)")
    a = ap.parse_args()
    import tempfile

    work = Path(a.work or tempfile.mkdtemp(prefix="kozan-loop-"))
    close_the_loop(work, a.items, a.eval_items, a.epochs, start_from=a.start_from, lr0=a.lr0, freeze=a.freeze)
