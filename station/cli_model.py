"""`kozan dataset ...` and `kozan model ...`: the ML engineer's commands.

Training imports torch through `vision.training` only inside these handlers, so the station's
own commands never pay for (or need) the `train` extra.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vision.taxonomy import REPO_ROOT


def _progress(prefix: str):
    t0 = time.monotonic()

    def show(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            rate = done / max(time.monotonic() - t0, 1e-6)
            sys.stderr.write(f"\r{prefix}: {done}/{total} images ({rate:.1f}/s)")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return show


def cmd_dataset_synth(a: argparse.Namespace) -> int:
    from vision.datasets import write_synth_dataset

    from vision.render.items import SUBTYPES
    from vision.render.synth import SynthSettings

    settings = SynthSettings(line_look_p=a.line_look)
    if a.board_battery is not None:
        settings.attach_battery_p = a.board_battery
    if a.distractor_share is not None:
        if not 0.0 <= a.distractor_share <= 1.0:
            print(f"--distractor-share {a.distractor_share}: expected a share between 0 and 1", file=sys.stderr)
            return 2
        settings.distractor_p = a.distractor_share
    for spec in a.class_weight or []:
        name, _, w = spec.partition("=")
        if name not in settings.class_weights or not w:
            print(f"--class-weight {spec!r}: expected CLASS=WEIGHT with CLASS one of "
                  f"{sorted(settings.class_weights)}", file=sys.stderr)
            return 2
        try:
            settings.class_weights[name] = float(w)
        except ValueError:
            print(f"--class-weight {spec!r}: the weight must be a number", file=sys.stderr)
            return 2
    for spec in a.subtype_weight or []:
        key, _, w = spec.partition("=")
        kind, _, sub = key.partition("/")
        if sub not in SUBTYPES.get(kind, ()) or not w:
            print(f"--subtype-weight {spec!r}: expected CLASS/SUBTYPE=WEIGHT, one of "
                  f"{[f'{k}/{s_}' for k, v in SUBTYPES.items() for s_ in v]}", file=sys.stderr)
            return 2
        try:
            weight = float(w)
        except ValueError:
            weight = float("nan")
        if not weight >= 0:
            print(f"--subtype-weight {spec!r}: the weight must be a number, 0 or more", file=sys.stderr)
            return 2
        settings.subtype_weights[key] = weight
    m = write_synth_dataset(Path(a.out), a.n, a.seed, val_fraction=a.val_fraction, test_n=a.test_n,
                            workers=a.workers, progress=_progress("synth"), settings=settings)
    print(json.dumps({"out": str(a.out), "fingerprint": m["fingerprint"], "n_train": m["n_train"],
                      "n_val": m["n_val"], "n_test": m["n_test"], "boxes": m["boxes"]}, indent=1))
    return 0


def cmd_dataset_board_crops(a: argparse.Namespace) -> int:
    from station.simline.board_crops import write_board_crops

    m = write_board_crops(Path(a.out), a.n, a.seed, val_fraction=a.val_fraction, battery_share=a.battery_share,
                          jitter=a.jitter, progress=_progress("board crops"))
    print(json.dumps({k: m[k] for k in ("n", "fingerprint", "boxes", "crops_with_a_battery")} | {"out": str(a.out)},
                     indent=1))
    return 0


def cmd_dataset_battery_crops(a: argparse.Namespace) -> int:
    from vision.battery_crops import write_battery_crops

    m = write_battery_crops(Path(a.out), a.n, a.seed, val_fraction=a.val_fraction, test_scenes=a.test_n,
                            jitter=a.jitter, line_look=a.line_look, distractor_p=a.distractor_p,
                            negative_p=a.negative_p, workers=a.workers, progress=_progress("battery crops"))
    print(json.dumps({k: m[k] for k in ("scenes", "test_scenes", "fingerprint", "crops_centred_on")}
                     | {"out": str(a.out)}, indent=1))
    return 0


def cmd_model_train(a: argparse.Namespace) -> int:
    from vision.training import TrainExtraMissing, TrainRecipe, train

    try:
        run = train(TrainRecipe(data=Path(a.data), model=a.model, imgsz=a.imgsz, epochs=a.epochs, batch=a.batch,
                                workers=a.workers, threads=a.threads, name=a.name, resume=a.resume,
                                project=Path(a.project), lr0=a.lr0, warmup_epochs=a.warmup_epochs,
                                close_mosaic=a.close_mosaic, hours=a.hours, freeze=a.freeze, nbs=a.nbs,
                                scale=a.scale))
    except TrainExtraMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {run}")
    return 0


def _imgsz(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or any(p <= 0 or p % 32 for p in parts):
        raise argparse.ArgumentTypeError(f"input size {text!r}: give N or H,W, each a positive multiple of 32")
    return parts[0], parts[1]


def cmd_model_export(a: argparse.Namespace) -> int:
    from vision.datasets import data_yaml_fingerprint
    from vision.training import TrainExtraMissing, export_onnx

    fp = data_yaml_fingerprint(Path(a.data)) if a.data else "unknown"
    try:
        out = export_onnx(Path(a.weights), Path(a.out), a.imgsz, a.version, fp)
    except TrainExtraMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out} (data fingerprint {fp})")
    return 0


def cmd_model_shrink(a: argparse.Namespace) -> int:
    from vision.shrink import ShrinkError, shrink_weights
    from vision.training import REPO_ROOT, TrainExtraMissing, _offline_ultralytics

    try:
        _offline_ultralytics(REPO_ROOT / "runs" / "ultralytics-config", threads=2)
        info = shrink_weights(Path(a.weights), Path(a.arch), Path(a.out))
    except (TrainExtraMissing, ShrinkError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    return 0


def cmd_model_eval(a: argparse.Namespace) -> int:
    # onnxruntime only: nothing on this path imports torch (tests/vision/test_evaluation.py checks)
    from station.config import StationConfig
    from vision.detector import ModelError
    from vision.evaluation import DatasetError, EvalConfig, evaluate, format_report, write_report

    d = StationConfig().detector
    cfg = EvalConfig(split=a.split, conf_threshold=d.conf_threshold if a.conf is None else a.conf,
                     iou_threshold=d.iou_threshold if a.iou is None else a.iou, threads=a.threads,
                     distractor_frames=a.distractor_frames, limit=a.limit)
    try:
        report = evaluate(Path(a.model), Path(a.data), cfg, progress=_progress(f"eval {a.split}"))
    except (ModelError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if a.out:
        paths = write_report(report, Path(a.out))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    if a.json:
        print(json.dumps(report))
    return 0


def cmd_model_quantize(a: argparse.Namespace) -> int:
    from vision.detector import ModelError
    from vision.evaluation import DatasetError
    from vision.quantize import QuantizeError, quantize_static_int8

    try:
        info = quantize_static_int8(Path(a.model), Path(a.calib), Path(a.out), n_images=a.images,
                                    split=a.split, method=a.method, seed=a.seed, version=a.version,
                                    progress=_progress("calibration"))
    except (ModelError, DatasetError, QuantizeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    return 0


def _generated_set_args(s: argparse.ArgumentParser, what: str, val_fraction: float) -> None:
    """What every generated dataset takes: how many, from which seed, where, and its val share."""
    s.add_argument("--n", type=int, required=True, help=f"{what} (train+val)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--out", required=True)
    s.add_argument("--val-fraction", type=float, default=val_fraction)


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    ds = sub.add_parser("dataset", help="datasets for training and evaluation")
    dsub = ds.add_subparsers(dest="dataset_cmd", required=True)
    s = dsub.add_parser("synth", help="write an ultralytics-ready synthetic dataset from the renderer")
    _generated_set_args(s, "images", 0.08)
    s.add_argument("--test-n", type=int, default=0, help="held-out test images (other seed, shifted settings)")
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--line-look", type=float, default=0.0,
                   help="share of scenes under a station's fixed plain look (the rest fully randomised)")
    s.add_argument("--board-battery", type=float, default=None,
                   help="share of boards that carry a battery (default 0.12): raise it to teach attached cells")
    s.add_argument("--distractor-share", type=float, default=None,
                   help="share of items that are distractors, unlabelled cables, plastic and screws (default 0.25): "
                        "raise it to teach what not to box")
    s.add_argument("--class-weight", action="append", metavar="CLASS=WEIGHT",
                   help="relative frequency of a class in the scenes (default 1 each); repeatable")
    s.add_argument("--subtype-weight", action="append", metavar="CLASS/SUBTYPE=WEIGHT",
                   help="relative frequency of a subtype within its class, e.g. alkaline/9V=4 (a look the model "
                        "misses); repeatable")
    s.set_defaults(func=cmd_dataset_synth)
    s = dsub.add_parser("board-crops", help="board crops from the simulated line's camera, for the board inspector")
    _generated_set_args(s, "crops", 0.15)
    s.add_argument("--battery-share", type=float, default=0.5, help="share of boards carrying a battery")
    s.add_argument("--jitter", type=float, default=0.03,
                   help="s.d. of each crop edge's error, as a share of the board's size (a detector's box error)")
    s.set_defaults(func=cmd_dataset_board_crops)
    s = dsub.add_parser("battery-crops", help="close crops of loose batteries from rendered scenes, for the "
                                              "battery inspector (--n counts scenes)")
    _generated_set_args(s, "scenes", 0.1)
    s.add_argument("--test-n", type=int, default=0, help="held-out test scenes (other seed, shifted settings)")
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--line-look", type=float, default=0.5,
                   help="share of scenes under a station's fixed plain look (the rest fully randomised)")
    s.add_argument("--jitter", type=float, default=0.08,
                   help="s.d. of each crop edge's error, as a share of the item's size (a far-view box's error)")
    s.add_argument("--distractor-p", type=float, default=0.3,
                   help="share of rendered items that are distractors (cables, plastic fragments, screws)")
    s.add_argument("--negative-p", type=float, default=0.5,
                   help="share of distractors that get a crop of their own, labelled 'no battery here'")
    s.set_defaults(func=cmd_dataset_battery_crops)

    md = sub.add_parser("model", help="train and export detectors (needs the 'train' extra)")
    msub = md.add_subparsers(dest="model_cmd", required=True)
    t = msub.add_parser("train", help="train with ultralytics, offline")
    t.add_argument("--data", required=True, help="dataset data.yaml")
    t.add_argument("--model", default="yolo11n.yaml", help="architecture yaml (from scratch) or weights .pt")
    t.add_argument("--imgsz", type=int, default=320)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    t.add_argument("--name", default="kozan-det")
    t.add_argument("--project", default=str(REPO_ROOT / "runs" / "train"))
    t.add_argument("--resume", action="store_true", help="resume the run's last checkpoint")
    t.add_argument("--lr0", type=float, default=None, help="initial learning rate (SGD); default: ultralytics' choice")
    t.add_argument("--scale", type=float, default=0.3,
                   help="random zoom, ± this share (default 0.3); near 0 for a model that reads sizes in pixels")
    t.add_argument("--warmup-epochs", type=float, default=3.0, help="0 when fine-tuning trained weights")
    t.add_argument("--close-mosaic", type=int, default=2, help="last epochs trained without mosaic "
                   "(= --epochs for none: mosaic shrinks a line frame's small cells further)")
    t.add_argument("--freeze", type=int, default=None,
                   help="keep the first N layers as they are (10: YOLO11's backbone) — for a fine-tune on a few "
                        "hundred captured frames")
    t.add_argument("--nbs", type=int, default=None,
                   help="images per optimiser step (ultralytics accumulates to 64; set it to --batch for a "
                        "fine-tune on few frames)")
    t.add_argument("--hours", type=float, default=None,
                   help="time budget in hours; the schedule is fitted to it (overrides --epochs)")
    t.set_defaults(func=cmd_model_train)
    e = msub.add_parser("export", help="export weights to ONNX with Kozan metadata")
    e.add_argument("weights")
    e.add_argument("--out", required=True)
    e.add_argument("--imgsz", type=_imgsz, default=(320, 320),
                   help="input size: N (square) or H,W (e.g. 256,416 for a 16:9 camera)")
    e.add_argument("--version", required=True)
    e.add_argument("--data", default=None, help="the data.yaml it was trained on (for the fingerprint)")
    e.set_defaults(func=cmd_model_export)
    v = msub.add_parser("eval", help="mAP, per-class P/R/AP, confusion matrix, distractor FPs and latency "
                                      "through the station's onnxruntime detector (no torch)")
    v.add_argument("model", help="an ONNX model exported the project's way")
    v.add_argument("data", help="a YOLO dataset's data.yaml")
    v.add_argument("--split", default="test", help="train, val or test (default: the held-out test split)")
    v.add_argument("--out", default=None, help="folder for eval.json, confusion_matrix.json and .png")
    v.add_argument("--conf", type=float, default=None,
                   help="operating threshold for P/R and the confusion matrix (default: the station's)")
    v.add_argument("--iou", type=float, default=None, help="NMS IoU (default: the station's)")
    v.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    v.add_argument("--distractor-frames", type=int, default=0,
                   help="also render N distractor-only frames and report false positives on them")
    v.add_argument("--limit", type=int, default=None, help="first N images only")
    v.add_argument("--json", action="store_true", help="also print the whole report as one JSON line")
    v.set_defaults(func=cmd_model_eval)
    k = msub.add_parser("shrink", help="start a narrower architecture from trained weights (fine-tune it next)")
    k.add_argument("weights", help="trained weights (.pt) of the wide network")
    k.add_argument("--arch", required=True, help="the narrower architecture's yaml, e.g. vision/arch/yolo11n-narrow.yaml")
    k.add_argument("--out", required=True, help="the narrow checkpoint (.pt) to write; train it with --model")
    k.set_defaults(func=cmd_model_shrink)
    q = msub.add_parser("quantize", help="static int8 (QDQ) quantisation calibrated on dataset images")
    q.add_argument("model", help="the float ONNX model")
    q.add_argument("--calib", required=True, help="a YOLO dataset's data.yaml to calibrate on")
    q.add_argument("--split", default="train", help="split to draw calibration images from (never the test split)")
    q.add_argument("--images", type=int, default=200, help="calibration images")
    q.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax")
    q.add_argument("--seed", type=int, default=0, help="which calibration images are drawn")
    q.add_argument("--out", required=True, help="the int8 ONNX model to write")
    q.add_argument("--version", default=None,
                   help="the version the file names itself (default: the float model's, suffixed -int8)")
    q.set_defaults(func=cmd_model_quantize)
    __import__("station.cli_loop").cli_loop.add_loop_commands(sub)   # capture -> data -> registry (issue 7)
