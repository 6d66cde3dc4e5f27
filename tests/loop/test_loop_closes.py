"""The loop, end to end: line → capture → labels → fine-tune → gate → hot-swap → the line again.

At CI scale, on the simulated line in virtual time:
  1. the station runs a deliberately weak model on a stream of items under one station's look
     and captures what the model was unsure of, what went to manual, and a random sample;
  2. a labeller corrects the pre-labels — here from the simulator's ground truth, through the
     same CVAT export/import a person would use;
  3. the corrected frames, with an equal share of rendered scenes like those the model learned
     from (`kozan dataset merge --synth-fraction 0.5`: a handful of line frames alone teach the
     model to forget what they show too rarely), fine-tune the model briefly (ultralytics):
     backbone frozen, no mosaic, one optimiser step per batch;
  4. the result is exported, carded in a registry, and promoted through the gate (golden set:
     held-out captured frames; per-class AP50, and per-class recall and precision at the rules'
     `min_confidence`, against the active model);
  5. a new stream of items (never seen in training) runs twice under the same look: once with
     the weak model, once hot-swapping to the promoted model in the background as the run starts.

The weak model is the shipped det-v4 with its Li-ion pack scores pushed down (a logit shift on
that class in the detection head): a station whose line shows packs unlike anything trained on.
It still finds the packs but is unsure of them, so they go to the manual path — safe, but lost.
The shipped models themselves sort this look's items almost perfectly, so they leave nothing for
the loop to show; the first shipped model (det-v1) is weak everywhere and a few dozen frames do
not fix it (docs/loop.md has those runs). Run `python -m tests.loop.test_loop_closes --help` for
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
WEAKEN = ("li_ion_pack", -4.0)   # the deliberately weak model: det-v4, unsure of Li-ion packs on this line


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


def weaken_class(base_pt: Path, out_onnx: Path, class_name: str, logit_shift: float) -> Path:
    """The deliberately weak model: a good one whose scores for one class sit below the sorting threshold.

    It stands for a station whose line shows a class differently from anything trained on (another
    supplier's battery packs, another light): the model still finds the items but is unsure of them,
    so they go to the manual path. Built by adding `logit_shift` to that class's score bias in every
    output scale of the detection head, then exported the project's way (same input, metadata).
    """
    import torch

    from vision.detector import model_card_meta
    from vision.taxonomy import load_taxonomy
    from vision.training import export_onnx

    ckpt = torch.load(base_pt, map_location="cpu", weights_only=False)
    model = ckpt["model"]
    k = list(load_taxonomy().names).index(class_name)
    with torch.no_grad():
        for branch in model.model[-1].cv3:          # Detect head: one class branch per output scale
            branch[-1].bias[k] += logit_shift
    ckpt.update(model=model, ema=None)               # fine-tuning resumes from `model`, not an old EMA
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out_onnx.with_suffix(".pt"))
    hw = tuple(model_card_meta(base_pt.with_suffix(".onnx"))["input_hw"])
    return export_onnx(out_onnx.with_suffix(".pt"), out_onnx, hw, out_onnx.stem, f"weakened-{class_name}")


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
                   start_from: str = "det-v4", weaken: tuple[str, float] | None = WEAKEN, lr0: float = 0.001,
                   freeze: int = 10, synth_n: int = 0, synth_fraction: float = 0.5, log=print) -> dict[str, Any]:
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
    shipped = Registry(REPO / "models").entry(start_from).onnx
    if weaken:
        t0 = time.perf_counter()
        shipped = weaken_class(shipped.with_suffix(".pt"), work / "weak" / f"{start_from}-weak.onnx", *weaken)
        lap("weak model", t0)
    for ext in (".onnx", ".pt"):           # laid out as a station's first install: a lone active.onnx
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
    # what the loop retrains is the detector: the battery inspector's close looks would read the weak
    # model's packs right on their own and hide what retraining does (the board inspector's looks
    # only decide whether a board carries a cell, so they stay)
    cfg.inspector.battery_model = None
    # pinned: which frames capture takes (and so the dozen-frame golden set the gate judges on) depends
    # on what the board inspector sends to manual; this scenario was measured with insp-v1, and an
    # inspector upgrade must not re-roll the loop's data (insp-v2 here: a 2-item nimh swing refused)
    cfg.inspector.model = "models/inspector/insp-v1.onnx"

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
    sources = [collected]
    if synth_n:
        # a share of rendered scenes like those the model learned from, so the fine-tune does
        # not forget what the few captured frames show too rarely (`kozan dataset merge`)
        from vision.datasets import write_synth_dataset

        write_synth_dataset(work / "synth", synth_n, seed=COLLECT_SEED, val_fraction=0.0, workers=1)
        sources.append(work / "synth")
    merged = dt.merge(sources, work / "train-set", synth_fraction=synth_fraction if synth_n else None)
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
    conf = cfg.rules.min_confidence
    gate = check_promotion(reg, cand, rules, tuple(load_taxonomy().names), golden_fingerprint(golden), tolerance,
                           latency_budget_ms=1000.0, evaluate=lambda p: golden_metrics(p, golden, conf),
                           operating_conf=conf, recall_tolerance=tolerance)
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
        "per_class_before": before["per_class"], "per_class_after": after["per_class"],
        "capture": {**cap, "line_s": rep_c["line_s"], "frames_per_line_hour": round(cap["written"] / line_h),
                    "mb_per_line_hour": round(disk_mb / line_h, 1), "per_reason": stats["per_reason"],
                    "duplicates_removed": dedup["duplicates"]},
        "capture_default_settings": {**bc, "line_s": before["line_s"],
                                     "frames_per_line_hour": round(bc["written"] / (before["line_s"] / 3600)),
                                     "mb_per_line_hour": round(default_mb / (before["line_s"] / 3600), 1)},
        "data": {"split": split, "train": merged["n_train"], "val": merged["n_val"],
                 "synthetic_train": merged["synthetic_train"]},
        "hot_swap": {**swap.rec, "switched_at_frame": sw and sw["frame"],
                     "tracks_in_flight": sw and sw["tracks_in_flight"],
                     "frames_rendered": after["frames_rendered"], "frames_processed": after["frames"],
                     "frames_missed": after["frames_rendered"] - after["frames"]},
        "timings_s": {**timings, "total": round(time.perf_counter() - t_start, 1)},
    }
    log("[loop] " + json.dumps(out, indent=1, default=str))
    return out


# CI scale: what one run of the test costs on 2 cores (docs/loop.md has the timings)
N_COLLECT, N_EVAL, EPOCHS, SYNTH_N = 200, 60, 15, 80


def _to_bin(per_class: dict, cls: str, b: str) -> int:
    return per_class.get(cls, {}).get("bins", {}).get(b, 0)


@pytest.mark.slow
def test_the_loop_closes_weak_model_to_better_line(tmp_path):
    """Every step of the loop, for real, and the line better at the end — with the numbers printed.

    The weak model sends the Li-ion packs it is unsure of to manual; those items are captured, the
    labeller corrects them, the fine-tune learns them, the gate promotes the result because it
    finds packs at the sorting threshold again (AP50 alone barely moves: the weak model ranks its
    boxes as well as before), and the hot-swapped model sorts new items better, missing no frame.
    """
    pytest.importorskip("ultralytics", reason="the loop test fine-tunes: it needs the 'train' extra (make test installs it)")
    r = close_the_loop(tmp_path, n_collect=N_COLLECT, n_eval=N_EVAL, epochs=EPOCHS, synth_n=SYNTH_N)
    pack_gate = r["gate"].get("per_class_recall@0.4", {}).get("li_ion_pack")
    print(f"\npromoted: {r['promoted']} {r['refusals']}\nbefore: purity {r['before']['purity']} recovery "
          f"{r['before']['recovery']}   after: purity {r['after']['purity']} recovery {r['after']['recovery']}   "
          f"(items {r['after']['items']}; packs recall@0.4 on the golden set {pack_gate}; hot-swap {r['hot_swap']})")
    cap = r["capture"]
    assert cap["written"] >= 60 and cap["failed"] == 0 and cap["stopped"] is None
    # the weak model's doubts are what capture went for: items it sent to manual or scored low
    assert cap["per_reason"].get("manual", 0) + cap["per_reason"].get("low_confidence", 0) >= 10, cap["per_reason"]
    assert r["data"]["train"] >= 60 and r["data"]["synthetic_train"] > 0 and r["data"]["split"]["test"] >= 15
    # the gate promoted it, and saw why: packs found at the sorting threshold on the golden set
    assert r["promoted"], r["refusals"]
    assert pack_gate["candidate"] >= pack_gate["active"] + 0.3, pack_gate
    # the line: new items, same look — packs reach bin 1 now, recovery up, purity not down
    pb, pa = r["per_class_before"], r["per_class_after"]
    assert _to_bin(pa, "li_ion_pack", "1") > _to_bin(pb, "li_ion_pack", "1"), (pb.get("li_ion_pack"), pa.get("li_ion_pack"))
    assert r["after"]["recovery"] >= r["before"]["recovery"] + 0.05
    assert r["after"]["purity"] >= r["before"]["purity"] - 0.02
    # the promoted model reached the running line by a hot-swap that missed no frame
    assert r["hot_swap"]["frames_missed"] == 0 and r["hot_swap"]["switched_at_frame"] is not None


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=N_COLLECT)
    ap.add_argument("--eval-items", type=int, default=N_EVAL)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--work", default=None)
    ap.add_argument("--start-from", default="det-v4", help="registry version the weak model is made from")
    ap.add_argument("--lr0", type=float, default=0.001)
    ap.add_argument("--freeze", type=int, default=10, help="layers kept as they are (10: the backbone; 0: none)")
    ap.add_argument("--synth", type=int, default=SYNTH_N, help="rendered scenes to mix into the fine-tune set")
    ap.add_argument("--weaken", default=f"{WEAKEN[0]}:{WEAKEN[1]}",
                    help="CLASS:LOGIT_SHIFT applied to --start-from ('' for none)")
    a = ap.parse_args()
    import tempfile

    work = Path(a.work or tempfile.mkdtemp(prefix="kozan-loop-"))
    weaken = (a.weaken.split(":")[0], float(a.weaken.split(":")[1])) if a.weaken else None
    close_the_loop(work, a.items, a.eval_items, a.epochs, start_from=a.start_from, weaken=weaken, lr0=a.lr0,
                   freeze=a.freeze, synth_n=a.synth)
