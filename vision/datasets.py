"""Dataset formats: writing ultralytics-ready YOLO datasets from the synthetic renderer.

Layout (what ultralytics expects): `images/{train,val,test}/*.jpg`, `labels/.../*.txt` with one
`class cx cy w h` line per box (normalised), and `data.yaml` naming the classes in taxonomy order.
Each image is generated from `(seed, index)` alone, so any image can be regenerated and a set can
be extended or split across processes without changing what it contains.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import yaml

from vision.render.synth import Label, SynthSettings, render_scene, resize_for_storage, shifted_settings
from vision.taxonomy import load_taxonomy

log = logging.getLogger(__name__)

STORE_WIDTH = 640


def yolo_lines(labels: list[Label], width: int, height: int) -> list[str]:
    tax = load_taxonomy()
    out = []
    for l in labels:
        x0, y0, x1, y1 = l.box
        cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
        w, h = (x1 - x0) / width, (y1 - y0) / height
        out.append(f"{tax.id_of(l.class_name)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return out


def _write_one(args: tuple[Path, str, int, int, dict]) -> tuple[int, dict[str, int]]:
    out, split, seed, index, settings = args
    cv2.setNumThreads(1)
    cfg = SynthSettings(**settings)
    rng = np.random.default_rng([seed, index])
    img, labels = render_scene(rng, cfg)
    img, labels = resize_for_storage(img, labels, STORE_WIDTH)
    name = f"{seed}_{index:07d}"
    cv2.imwrite(str(out / "images" / split / f"{name}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 93])
    (out / "labels" / split / f"{name}.txt").write_text("\n".join(yolo_lines(labels, img.shape[1], img.shape[0])) + "\n")
    counts: dict[str, int] = {}
    for l in labels:
        counts[l.class_name] = counts.get(l.class_name, 0) + 1
    return index, counts


def tally_jobs(fn: Callable[[tuple], tuple[int, dict[str, int]]], jobs: list[tuple], workers: int | None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, int]]:
    """Run image-writing jobs (`job[1]` is the split) on worker processes; label counts per split.

    Never fork: the caller may hold onnxruntime/OpenCV/torch threads (a test process, a running
    station), and a forked child can inherit a lock one of them held and hang forever. Spawned
    workers start clean; one worker needs no pool at all.
    """
    totals: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    workers = workers or max(1, (os.cpu_count() or 2))
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) \
        if workers > 1 else None
    results = pool.map(fn, jobs, chunksize=8) if pool is not None else map(fn, jobs)
    try:
        for done, (job, (_, counts)) in enumerate(zip(jobs, results), 1):
            for k, v in counts.items():
                totals[job[1]][k] = totals[job[1]].get(k, 0) + v
            if progress:
                progress(done, len(jobs))
    finally:
        if pool is not None:
            pool.shutdown()
    return totals


def write_synth_dataset(
    out: Path,
    n: int,
    seed: int,
    val_fraction: float = 0.1,
    test_n: int = 0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    settings: SynthSettings | None = None,
) -> dict:
    """Write `n` train+val images and `test_n` held-out test images (shifted settings, seed+1_000_003)."""
    out = Path(out)
    base = settings or SynthSettings()
    jobs: list[tuple[Path, str, int, int, dict]] = []
    n_val = int(round(n * val_fraction))
    for i in range(n):
        jobs.append((out, "val" if i < n_val else "train", seed, i, asdict(base)))
    test_seed = seed + 1_000_003
    for i in range(test_n):
        jobs.append((out, "test", test_seed, i, asdict(shifted_settings(base))))
    for split in ("train", "val", "test"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    totals = tally_jobs(_write_one, jobs, workers, progress)
    write_data_yaml(out, with_test=bool(test_n))
    manifest = {
        "generator": "kozan synth", "seed": seed, "test_seed": test_seed if test_n else None,
        "n_train": n - n_val, "n_val": n_val, "n_test": test_n, "settings": asdict(base),
        "test_settings": asdict(shifted_settings(base)) if test_n else None,
        "boxes": totals, "fingerprint": dataset_fingerprint(out),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def write_data_yaml(out: Path, with_test: bool = False) -> Path:
    """The ultralytics data.yaml of a generated set in `out`: its splits and the taxonomy's classes."""
    tax = load_taxonomy()
    data = {"path": str(Path(out).resolve()), "train": "images/train", "val": "images/val",
            "names": {c.id: c.name for c in tax.classes}}
    if with_test:
        data["test"] = "images/test"
    p = Path(out) / "data.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def data_yaml_fingerprint(data_yaml: Path) -> str:
    """The fingerprint of exactly the label files a data.yaml trains and validates on.

    A data.yaml may list several image folders (e.g. a broad set plus line-look scenes); each
    `.../images/<split>` folder's labels live in `.../labels/<split>`, the ultralytics layout.
    """
    data_yaml = Path(data_yaml)
    d = yaml.safe_load(data_yaml.read_text(encoding="utf-8"))
    base = Path(d.get("path") or data_yaml.parent)
    if not base.is_absolute():
        base = data_yaml.parent / base
    h = hashlib.sha256()
    for key in ("train", "val"):
        entries = d.get(key) or []
        for entry in [entries] if isinstance(entries, str) else entries:
            img_dir = base / entry
            lbl_dir = Path(str(img_dir).replace("/images/", "/labels/").replace("\\images\\", "\\labels\\"))
            for p in sorted(lbl_dir.glob("*.txt")):
                h.update(f"{key}/{p.parent.name}/{p.name}".encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def dataset_fingerprint(root: Path) -> str:
    """A short hash over label files' names and contents: what a model was trained on, checkable later."""
    h = hashlib.sha256()
    for p in sorted(Path(root).glob("labels/*/*.txt")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
