"""Training and ONNX export around ultralytics — the only module that imports torch.

Everything here runs offline: ultralytics is told it has no network, may install nothing, keeps
its settings in a folder we own, and never plots (plotting fetches a font). The station never
imports this module; it is reached only through `kozan model ...` with the `train` extra.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


class TrainExtraMissing(RuntimeError):
    pass


def _offline_ultralytics(config_dir: Path, threads: int):
    """Import ultralytics with the network, auto-installs and font downloads shut off."""
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "False"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch
        import ultralytics
        from ultralytics.utils import torch_utils
    except ImportError as e:  # pragma: no cover - depends on the install
        raise TrainExtraMissing(
            f"training needs the 'train' extra ({e}); install it with: pip install -e '.[train]'"
        ) from e
    wanted = {"sync": False, "tensorboard": False, "wandb": False, "mlflow": False, "comet": False,
              "clearml": False, "dvc": False, "neptune": False, "raytune": False, "vscode_msg": False,
              "weights_dir": str(config_dir / "weights"), "datasets_dir": str(REPO_ROOT / "datasets")}
    # settings differ between ultralytics releases: set only the ones this release knows
    ultralytics.settings.update({k: v for k, v in wanted.items() if k in ultralytics.settings})
    # ultralytics trains with cpu_count-1 threads: on a 2-core PC that is 1, ~1.6x slower than 2
    torch_utils.NUM_THREADS = threads
    torch.set_num_threads(threads)
    return ultralytics


@dataclass
class TrainRecipe:
    data: Path
    model: str = "yolo11n.yaml"      # an architecture yaml (from scratch) or a .pt to fine-tune
    imgsz: int = 320
    epochs: int = 10
    batch: int = 16
    workers: int = 2
    threads: int = 2
    name: str = "kozan-det"
    project: Path = REPO_ROOT / "runs" / "train"
    resume: bool = False
    seed: int = 0
    patience: int = 100
    lr0: float | None = None           # None: ultralytics' default for the optimiser it picks
    warmup_epochs: float = 3.0         # fine-tuning from trained weights needs none
    close_mosaic: int = 2
    hours: float | None = None         # a time budget: ultralytics fits the schedule to it (overrides epochs)
    # ultralytics accumulates gradients up to a "nominal batch" of 64 images per optimiser step: a
    # fine-tune on a station's few dozen frames would take one step an epoch. nbs=batch steps every batch.
    nbs: int | None = None
    freeze: int | None = None          # keep the first N layers (the backbone: 10 for YOLO11) as they are
    # random zoom of ±scale: the camera's distance varies a little between stations (0.3). A model
    # that must read an item's size in pixels (the battery inspector: 18650 or AA) wants almost none.
    scale: float = 0.3


def train(recipe: TrainRecipe) -> Path:
    """Train; returns the run folder (weights/best.pt, weights/last.pt, results.csv)."""
    ul = _offline_ultralytics(recipe.project.parent / "ultralytics-config", recipe.threads)
    run_dir = recipe.project / recipe.name
    if recipe.resume and (run_dir / "weights" / "last.pt").exists():
        model = ul.YOLO(str(run_dir / "weights" / "last.pt"))
        model.train(resume=True, plots=False)
        return run_dir
    model = ul.YOLO(recipe.model)
    model.train(
        data=str(recipe.data), imgsz=recipe.imgsz, epochs=recipe.epochs, batch=recipe.batch,
        workers=recipe.workers, device="cpu", project=str(recipe.project), name=recipe.name,
        exist_ok=True, plots=False, seed=recipe.seed, deterministic=False, patience=recipe.patience,
        cache="ram", amp=False, verbose=True,
        # top-down view of a belt: vertical flips are as real as horizontal ones; no rotation
        # augmentation (it loosens axis-aligned boxes), no hue shift (colour carries class cues
        # for cells), modest scale jitter (the camera's distance is fixed on a station).
        fliplr=0.5, flipud=0.5, degrees=0.0, hsv_h=0.0, scale=recipe.scale, mosaic=1.0, close_mosaic=recipe.close_mosaic,
        warmup_epochs=recipe.warmup_epochs, **({"time": recipe.hours} if recipe.hours else {}), **({"lr0": recipe.lr0, "optimizer": "SGD"} if recipe.lr0 else {}),
        **({"nbs": recipe.nbs} if recipe.nbs else {}), **({"freeze": recipe.freeze} if recipe.freeze else {}),
    )
    return run_dir


def set_kozan_metadata(m, version: str, data_fingerprint: str, imgsz: tuple[int, int],
                       names: list[str] | None = None) -> None:
    """Add what the station's Detector reads (version, data fingerprint, input layout; class names
    when the model's own are not the taxonomy's) to an ONNX model proto, keeping ultralytics' keys."""
    meta = {p.key: p.value for p in m.metadata_props}
    meta.update({"kozan_version": version, "kozan_data_fingerprint": data_fingerprint,
                 "kozan_input": json.dumps({"imgsz": list(imgsz), "layout": "NCHW", "color": "RGB", "scale": "1/255"})})
    if names is not None:
        meta["names"] = str(dict(enumerate(names)))
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, str(v)


def export_onnx(weights: Path, out: Path, imgsz: int | tuple[int, int], version: str, data_fingerprint: str) -> Path:
    """Export to ONNX with a fixed input shape, simplified, with Kozan's metadata added.

    `imgsz` may be (height, width): a 16:9 camera letterboxed into a square wastes 44 % of the
    input on padding, so a rectangular input (e.g. 256x416) buys resolution at the same cost.
    """
    imgsz = tuple(imgsz) if isinstance(imgsz, (tuple, list)) else (imgsz, imgsz)
    ul = _offline_ultralytics(REPO_ROOT / "runs" / "ultralytics-config", 2)
    import onnx

    # ultralytics writes its ONNX beside the weights: exporting models/det-v4.pt elsewhere would
    # overwrite models/det-v4.onnx (and then delete it). Export from a private copy instead.
    with tempfile.TemporaryDirectory(prefix="kozan-export-") as tmp:
        private = Path(tmp) / Path(weights).name
        shutil.copy2(weights, private)
        model = ul.YOLO(str(private))
        produced = Path(model.export(format="onnx", imgsz=list(imgsz), dynamic=False, simplify=True, opset=17,
                                     nms=False, half=False, device="cpu"))
        m = onnx.load(str(produced))
    set_kozan_metadata(m, version, data_fingerprint, imgsz)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    if Path(weights).resolve() != out.with_suffix(".pt").resolve():
        shutil.copy2(weights, out.with_suffix(".pt"))
    return out
