"""From the line back to the model: `kozan dataset stats|split|merge|export|import|dedupe` and
`kozan model list|register|evaluate|promote|rollback`, plus `kozan model train --from VERSION`.

Registered from `station.cli_model.add_model_commands` onto its `dataset` and `model` groups.
torch/ultralytics are imported only inside the handlers that train or evaluate.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vision.taxonomy import REPO_ROOT

MODELS = REPO_ROOT / "models"


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a
    raise RuntimeError(f"{p.prog} has no subcommands")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


# ---- dataset --------------------------------------------------------------------------------------
def cmd_stats(a: argparse.Namespace) -> int:
    from vision.dataset_tools import stats

    _print(stats(Path(a.root)))
    return 0


def cmd_split(a: argparse.Namespace) -> int:
    from vision.dataset_tools import split

    _print(split(Path(a.root), val=a.val, test=a.test, seed=a.seed, only_human=a.only_human))
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from vision.dataset_tools import merge

    _print(merge([Path(s) for s in a.sources], Path(a.out), synth_fraction=a.synth_fraction, seed=a.seed,
                 include_prelabels=a.include_prelabels))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from vision.dataset_tools import export_cvat, export_labelstudio

    if a.format == "cvat":
        n = export_cvat(Path(a.root), Path(a.out))
        print(f"{n} frames -> {a.out} (CVAT: Upload annotations / create a task, format 'YOLO 1.1')")
    else:
        n = export_labelstudio(Path(a.root), Path(a.out), a.image_prefix)
        print(f"{n} tasks -> {a.out} (Label Studio: import the JSON; labelling config in "
              f"{Path(a.out).parent / 'labeling_config.xml'})")
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from vision.dataset_tools import import_labels

    _print(import_labels(Path(a.root), Path(a.src)))
    return 0


def cmd_dedupe(a: argparse.Namespace) -> int:
    from vision.dataset_tools import dedupe

    r = dedupe(Path(a.root), a.max_distance, a.dry_run)
    r["pairs"] = r["pairs"][:10]
    _print(r)
    return 0


# ---- model ------------------------------------------------------------------------------------------
def golden_metrics(onnx: Path, golden_yaml: Path, operating_conf: float | None = None) -> dict[str, Any]:
    """Per-class AP50 of a model on a golden set: the data.yaml's test split (its val split if none).

    Also per-class recall (and precision, for the card) at `operating_conf` (the sorting rules'
    `min_confidence`): the gate compares recall there too, since AP50 cannot see scores sinking below it.

    The project's own evaluation (`vision.evaluation`, onnxruntime only: promoting needs no torch)
    when it is there; otherwise ultralytics' validator on the ONNX file. Never a mAP of our own.
    """
    import yaml

    from station.config import RulesConfig

    if operating_conf is None:
        operating_conf = RulesConfig().min_confidence
    split = "test" if yaml.safe_load(Path(golden_yaml).read_text()).get("test") else "val"
    try:
        from vision.evaluation import EvalConfig, evaluate
    except ImportError:
        evaluate = None
    if evaluate is not None:
        r = evaluate(Path(onnx), Path(golden_yaml), EvalConfig(split=split, warmup=0, conf_threshold=operating_conf))
        per = {n: c["ap50"] for n, c in r["per_class"].items() if c.get("ap50") is not None}
        tp = {n: round((c["recall"] or 0) * c["instances"]) for n, c in r["per_class"].items()}
        return {"per_class_ap50": per, "map50": r["map50"], "golden": f"{golden_yaml}:{split}",
                "by": "vision.evaluation", "operating_conf": operating_conf,
                "per_class_recall": {n: c["recall"] for n, c in r["per_class"].items()},
                "per_class_precision": {n: c["precision"] for n, c in r["per_class"].items()},
                "per_class_tp": tp}
    from vision.detector import model_card_meta
    from vision.training import REPO_ROOT as _R, _offline_ultralytics

    ul = _offline_ultralytics(_R / "runs" / "ultralytics-config", 2)
    hw = model_card_meta(onnx)["input_hw"]
    model = ul.YOLO(str(onnx), task="detect")
    m = model.val(data=str(golden_yaml), imgsz=hw[0] if hw[0] == hw[1] else list(hw), batch=1, device="cpu",
                  plots=False, verbose=False, workers=0, split=split, project=str(_R / "runs" / "val"),
                  name="golden", exist_ok=True, rect=False)
    names = m.names if hasattr(m, "names") else model.names
    per = {names[int(c)]: round(float(ap), 4) for c, ap in zip(m.box.ap_class_index, m.box.ap50)}
    return {"per_class_ap50": per, "map50": round(float(m.box.map50), 4), "golden": f"{golden_yaml}:{split}",
            "by": "ultralytics"}


def golden_fingerprint(golden_yaml: Path) -> str:
    import yaml

    from vision.dataset_tools import _images_of, list_fingerprint

    d = yaml.safe_load(Path(golden_yaml).read_text())
    base = Path(d.get("path") or Path(golden_yaml).parent)
    if not base.is_absolute():   # as the evaluator reads it: relative to the YAML's own folder
        base = (Path(golden_yaml).parent / base).resolve()
    return list_fingerprint(_images_of(d.get("test") or d["val"], base))


def _registry(a: argparse.Namespace):
    from vision.registry import Registry

    return Registry(Path(a.models))


def cmd_list(a: argparse.Namespace) -> int:
    reg = _registry(a)
    active = reg.active_version()
    rows = []
    for e in reg.entries():
        c = e.card
        gold = c.get("golden", {})
        rows.append({"version": e.version, "active": e.version == active, "file": str(e.onnx.name),
                     "weights": e.pt.name if e.pt.exists() else None, "parent": c.get("parent"),
                     "data_fingerprint": c.get("data_fingerprint"), "created": c.get("created"),
                     "golden_map50": {k: v.get("map50") for k, v in gold.items()}})
    if a.json:
        _print({"active": active, "history": reg.history(), "versions": rows})
        return 0
    print(f"active: {active}   (history: {' -> '.join(reg.history()) or '-'})")
    for r in rows:
        mark = "*" if r["active"] else " "
        g = ", ".join(f"{k[:8]}:{v}" for k, v in r["golden_map50"].items()) or "no golden metrics"
        print(f"{mark} {r['version']:<16} {r['file']:<22} parent {r['parent'] or '-':<12} "
              f"data {r['data_fingerprint'] or '-':<16} {g}")
    return 0


def cmd_register(a: argparse.Namespace) -> int:
    from vision.datasets import data_yaml_fingerprint
    from vision.detector import model_card_meta

    reg = _registry(a)
    # the same fingerprint `kozan model export --data` writes into the model: the label files the
    # data.yaml names (several folders for a merged set), not its parent folder
    fp = data_yaml_fingerprint(Path(a.data)) if a.data else model_card_meta(Path(a.onnx)).get("data_fingerprint")
    e = reg.register(Path(a.onnx), a.version, parent=getattr(a, "parent", None), data_fingerprint=fp,
                     data=a.data, notes=a.notes)
    if a.golden:
        reg.record_metrics(e.version, golden_fingerprint(Path(a.golden)), golden_metrics(e.onnx, Path(a.golden)))
    _print(reg.card(e.version))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    reg = _registry(a)
    e = reg.entry(a.version)
    m = golden_metrics(e.onnx, Path(a.golden))
    reg.record_metrics(e.version, golden_fingerprint(Path(a.golden)), m)
    _print(m)
    return 0


def simulated_line_verdict(cfg: Any, model: Path, items: int, seed: int) -> dict[str, Any]:
    """The station as configured (its rules, both inspectors) sorting a fixed simulated batch with
    `model` as its detector: what the gate's last step compares."""
    from station.report import line_verdict
    from station.simrun import run_fast

    c = cfg.model_copy(deep=True)
    c.detector.model = str(model)
    c.camera.source, c.link.port = "sim", "sim"
    return line_verdict(run_fast(c, items, seed=seed), c)


def gate(reg: Any, version: str, golden: str | None, tolerance: float, budget_ms: float | None, config: str | None,
         recall_tolerance: float = 0.05, min_items: int = 2, line_items: int = 0, line_seed: int = 11,
         line_tolerance: float = 0.01):
    from station.config import load_config
    from vision.registry import check_promotion
    from vision.taxonomy import load_taxonomy

    cfg = load_config(config)

    def line_check(model: Path) -> dict[str, Any]:
        print(f"gate: {line_items} simulated items (seed {line_seed}) with {model.name} ...", file=sys.stderr)
        return simulated_line_verdict(cfg, model, line_items, line_seed)

    budget = budget_ms if budget_ms is not None else 1000.0 / cfg.camera.fps
    rule_classes = sorted(n for n, b in cfg.rules.class_to_bin.items() if b != 0)
    fp = golden_fingerprint(Path(golden)) if golden else None
    conf = cfg.rules.min_confidence           # where the sorter acts: the gate compares recall there too
    return check_promotion(reg, version, rule_classes, tuple(load_taxonomy().names), fp, tolerance, budget,
                           evaluate=(lambda p: golden_metrics(p, Path(golden), conf)) if golden else None,
                           operating_conf=conf, recall_tolerance=recall_tolerance, min_items=min_items,
                           line_check=line_check if line_items > 0 else None, line_tolerance=line_tolerance)


def cmd_promote(a: argparse.Namespace) -> int:
    reg = _registry(a)
    if a.force:
        reg.set_active(a.version, f"forced: {a.force}")
        print(f"{a.version} is active (gate skipped: {a.force})")
        return 0
    res = gate(reg, a.version, a.golden, a.ap50_tolerance, a.latency_budget_ms, a.config, a.recall_tolerance,
               a.min_items, a.line_items, a.line_seed, a.line_tolerance)
    if not res.ok:
        print(res.explain(), file=sys.stderr)
        return 3
    reg.set_active(a.version, "promoted through the gate: " + json.dumps(res.details, sort_keys=True))
    print(res.explain())
    print(f"{a.version} is active; a running station switches to it within a second (hot-swap)")
    return 0


def cmd_rollback(a: argparse.Namespace) -> int:
    from vision.registry import RegistryError

    try:
        frm, to = _registry(a).rollback()
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rolled back {frm} -> {to}; a running station switches back within a second")
    return 0


def _wrap_train(train_parser: argparse.ArgumentParser) -> None:
    """`kozan model train --from VERSION`: start from that registry version's weights."""
    train_parser.add_argument("--from", dest="from_version", default=None, metavar="VERSION",
                              help="fine-tune from this registry version's weights (models/VERSION.pt); "
                                   "warm-up defaults to 0 then")
    train_parser.add_argument("--models", default=str(MODELS), help=argparse.SUPPRESS)
    train_parser.set_defaults(warmup_epochs=None)
    inner = train_parser.get_default("func")

    def run(a: argparse.Namespace) -> int:
        if a.from_version:
            from vision.registry import Registry, RegistryError

            try:
                e = Registry(Path(a.models)).entry(a.from_version)
            except RegistryError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            if not e.pt.exists():
                print(f"error: {a.from_version} has no weights ({e.pt} missing): only models exported with "
                      "`kozan model export` keep theirs beside the ONNX file", file=sys.stderr)
                return 2
            a.model = str(e.pt)
            print(f"fine-tuning from {a.from_version} ({e.pt})", file=sys.stderr)
        if a.warmup_epochs is None:
            a.warmup_epochs = 0.0 if a.from_version else 3.0
        return inner(a)

    train_parser.set_defaults(func=run)


def add_loop_commands(sub: argparse._SubParsersAction) -> None:
    dsub = _subparsers(sub.choices["dataset"])
    s = dsub.add_parser("stats", help="a collected dataset: frames per class, reason, day, model")
    s.add_argument("root", nargs="?", default=str(REPO_ROOT / "datasets" / "collected"))
    s.set_defaults(func=cmd_stats)
    s = dsub.add_parser("split", help="train/val/test lists (an item's frames stay together) and data.yaml")
    s.add_argument("root", nargs="?", default=str(REPO_ROOT / "datasets" / "collected"))
    s.add_argument("--val", type=float, default=0.2)
    s.add_argument("--test", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--only-human", action="store_true", help="only frames with imported (corrected) labels")
    s.set_defaults(func=cmd_split)
    s = dsub.add_parser("merge", help="one training set from collected + synthetic datasets")
    s.add_argument("sources", nargs="+", help="dataset folders (collected: with meta/; synthetic: with data.yaml)")
    s.add_argument("--out", required=True)
    s.add_argument("--synth-fraction", type=float, default=None, help="cap synthetic images at this share")
    s.add_argument("--include-prelabels", action="store_true",
                   help="also train on frames still carrying the model's own pre-labels")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_merge)
    s = dsub.add_parser("export", help="to a labelling tool: CVAT (YOLO 1.1 zip) or Label Studio (JSON tasks)")
    s.add_argument("root")
    s.add_argument("--format", choices=("cvat", "labelstudio"), required=True)
    s.add_argument("--out", required=True, help=".zip for cvat, .json for labelstudio")
    s.add_argument("--image-prefix", default="/data/local-files/?d=", help="Label Studio image URL prefix")
    s.set_defaults(func=cmd_export)
    s = dsub.add_parser("import", help="corrected labels back: CVAT YOLO 1.1 zip, Label Studio JSON, YOLO folder")
    s.add_argument("root")
    s.add_argument("src")
    s.set_defaults(func=cmd_import)
    s = dsub.add_parser("dedupe", help="move near-duplicate frames to duplicates/ (difference hash)")
    s.add_argument("root")
    s.add_argument("--max-distance", type=float, default=0.08, help="share of the 256 hash bits that may differ")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=cmd_dedupe)

    msub = _subparsers(sub.choices["model"])
    _wrap_train(msub.choices["train"])

    def models_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--models", default=str(MODELS), help="registry folder (default models/)")

    s = msub.add_parser("list", help="registry versions, the active one, their golden-set mAP50")
    models_arg(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    s = msub.add_parser("register", help="card an exported ONNX model in the registry (copied in if elsewhere)")
    models_arg(s)
    s.add_argument("onnx")
    s.add_argument("--version", default=None,
                   help="default: the version in the model's metadata (a name given must match it)")
    s.add_argument("--parent", default=None, help="the version it was fine-tuned from")
    s.add_argument("--data", default=None, help="the data.yaml it was trained on (fingerprint)")
    s.add_argument("--golden", default=None, help="evaluate on this golden data.yaml now")
    s.add_argument("--notes", default="")
    s.set_defaults(func=cmd_register)
    s = msub.add_parser("evaluate", help="per-class AP50 on a golden set, kept in the model card")
    models_arg(s)
    s.add_argument("version")
    s.add_argument("--golden", required=True)
    s.set_defaults(func=cmd_evaluate)
    s = msub.add_parser("promote", help="make VERSION active, after the validation gate")
    models_arg(s)
    s.add_argument("version")
    s.add_argument("--golden", default=None, help="golden data.yaml (val or test list) both models are judged on")
    s.add_argument("--ap50-tolerance", type=float, default=0.02, help="largest per-class AP50 loss allowed")
    s.add_argument("--recall-tolerance", type=float, default=0.05,
                   help="largest per-class recall loss allowed at the rules' min_confidence")
    s.add_argument("--min-items", type=int, default=2,
                   help="a recall loss counts only if it is at least this many golden-set items")
    s.add_argument("--latency-budget-ms", type=float, default=None,
                   help="median inference time allowed (default: one camera frame period)")
    s.add_argument("--line-items", type=int, default=200,
                   help="last step, once the rest passed: both models sort this many simulated items (seed "
                        "--line-seed; about 1 min per 100 items each on 2 cores); 0 skips it")
    s.add_argument("--line-seed", type=int, default=11)
    s.add_argument("--line-tolerance", type=float, default=0.01,
                   help="largest purity or recovery loss allowed on that batch (no Li-ion misroute is allowed)")
    s.add_argument("--config", "-c", default=None, help="station YAML whose sorting rules the classes must fit")
    s.add_argument("--force", default=None, metavar="WHY", help="skip the gate (recorded with the reason)")
    s.set_defaults(func=cmd_promote)
    s = msub.add_parser("rollback", help="back to the previously active version")
    models_arg(s)
    s.set_defaults(func=cmd_rollback)
