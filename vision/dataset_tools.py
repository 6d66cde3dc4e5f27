"""Collected datasets: statistics, splits, merging with synthetic data, labelling round trips, dedupe.

A collected dataset is what `station.capture` writes: `images/<name>.jpg`, `labels/<name>.txt`
(YOLO; the model's pre-labels until corrected ones are imported) and `meta/<name>.json`. Imported
corrections replace `labels/<name>.txt` (the pre-label is kept in `prelabels/`) and set
`meta.labels = "human"`. Nothing here imports torch.

Formats for labelling tools:
  CVAT         "YOLO 1.1" zip: obj.names, obj.data, train.txt, obj_train_data/<name>.jpg + .txt
               (import it as a task's annotations, or create the task from it; export it back the same way)
  Label Studio JSON tasks with the model's boxes as `predictions` (percent coordinates) plus a
               labelling config; its JSON export (tasks with `annotations`) imports back.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import zipfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
import yaml

from vision.taxonomy import load_taxonomy

log = logging.getLogger(__name__)

LS_FROM, LS_TO = "label", "image"


class DatasetError(RuntimeError):
    """A dataset operation that cannot be done; the message says why and what to do."""


# ---- reading a collected dataset --------------------------------------------------------------------
def captures(root: Path) -> list[dict[str, Any]]:
    """Every complete capture (its meta file exists), oldest first."""
    root = Path(root)
    if not (root / "meta").is_dir():
        raise DatasetError(f"{root} is not a collected dataset (no meta/ folder); capture writes one "
                           "(capture.enabled in station.yaml)")
    out = []
    for m in sorted((root / "meta").glob("*.json")):
        name = m.stem
        img = root / "images" / f"{name}.jpg"
        if not img.exists():
            continue
        out.append({"name": name, "meta": json.loads(m.read_text()), "image": img,
                    "label": root / "labels" / f"{name}.txt"})
    return out


def read_yolo(p: Path) -> list[tuple[int, float, float, float, float]]:
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5:
            rows.append((int(parts[0]), *map(float, parts[1:])))
    return rows


def write_yolo(p: Path, rows: Iterable[tuple[int, float, float, float, float]]) -> None:
    p.write_text("".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in rows))


def stats(root: Path) -> dict[str, Any]:
    names = load_taxonomy().names
    caps = captures(root)
    per_class: Counter = Counter()
    per_reason: Counter = Counter()
    per_day: Counter = Counter()
    per_model: Counter = Counter()
    labels: Counter = Counter()
    size = 0
    for c in caps:
        m = c["meta"]
        for r in m.get("reasons", [m.get("reason", "?")]):
            per_reason[r] += 1
        per_day[m.get("time", "?")[:10]] += 1
        per_model[m.get("model_version", "?")] += 1
        labels[m.get("labels", "model")] += 1
        for row in read_yolo(c["label"]):
            per_class[names[row[0]] if row[0] < len(names) else str(row[0])] += 1
        size += c["image"].stat().st_size
    return {"root": str(root), "frames": len(caps), "labels": dict(labels), "boxes_per_class": dict(per_class),
            "per_reason": dict(per_reason), "per_day": dict(sorted(per_day.items())), "per_model": dict(per_model),
            "image_mb": round(size / 1e6, 2)}


def _group(meta: dict[str, Any], name: str) -> str:
    """Frames of one item (one run's track) stay in one split: they are near-copies of each other."""
    run = name.split("_")[1] if name.count("_") >= 3 else ""
    return f"{run}:{meta.get('track_id', name)}"


def _h01(key: str, seed: int) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split(root: Path, val: float = 0.2, test: float = 0.0, seed: int = 0, only_human: bool = False) -> dict[str, Any]:
    """Write `splits/{train,val,test}.txt` (absolute image paths) and `data.yaml` in `root`."""
    root = Path(root)
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise DatasetError(f"val={val}, test={test}: each in [0, 1) and together below 1")
    lists: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for c in captures(root):
        if only_human and c["meta"].get("labels") != "human":
            continue
        u = _h01(_group(c["meta"], c["name"]), seed)
        part = "test" if u < test else "val" if u < test + val else "train"
        lists[part].append(str(c["image"].resolve()))
    (root / "splits").mkdir(exist_ok=True)
    for part, items in lists.items():
        (root / "splits" / f"{part}.txt").write_text("".join(f"{x}\n" for x in items))
    data = {"path": str(root.resolve()), "train": "splits/train.txt", "val": "splits/val.txt",
            "names": dict(enumerate(load_taxonomy().names)),
            "kozan_split": {"val": val, "test": test, "seed": seed, "only_human": only_human}}
    if lists["test"]:
        data["test"] = "splits/test.txt"
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return {part: len(v) for part, v in lists.items()}


# ---- merging collected + synthetic ----------------------------------------------------------------------
def _images_of(spec: Any, base: Path) -> list[Path]:
    """A data.yaml entry (folder, list file or a list of them) -> image paths."""
    specs = spec if isinstance(spec, list) else [spec]
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            out += sorted(x for x in p.rglob("*") if x.suffix.lower() in (".jpg", ".jpeg", ".png"))
        elif p.suffix == ".txt" and p.exists():
            out += [Path(x.strip()) if Path(x.strip()).is_absolute() else base / x.strip()
                    for x in p.read_text().splitlines() if x.strip()]
        else:
            raise DatasetError(f"{p}: neither an image folder nor a list file")
    return out


def label_of(img: Path) -> Path:
    """Where ultralytics looks for an image's labels: the last /images/ in its path -> /labels/."""
    s = str(img)
    i = s.rfind("/images/")
    return Path(s[:i] + "/labels/" + s[i + 8:]).with_suffix(".txt")


def list_fingerprint(images: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for img in sorted(images, key=lambda p: p.name):
        h.update(img.name.encode())
        lab = label_of(img)
        h.update(lab.read_bytes() if lab.exists() else b"")
    return h.hexdigest()[:16]


def merge(sources: list[Path], out: Path, synth_fraction: float | None = None, seed: int = 0,
          include_prelabels: bool = False) -> dict[str, Any]:
    """One training set from collected datasets and synthetic ones (each a folder with data.yaml).

    Collected frames contribute only human-checked labels unless `include_prelabels` (then the
    model's own predictions train it: self-training, rarely what you want). `synth_fraction`
    caps synthetic training images at that share of the result. Validation is the collected
    frames' val split when there is one (the line is what the model must be good at). A collected
    dataset is re-split with the settings of its last `kozan dataset split` (default val 0.2), so
    new frames join while each item keeps its split; its test split stays out of training: keep
    it as the golden set.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coll = {"train": [], "val": []}
    syn = {"train": [], "val": []}
    for src in sources:
        src = Path(src)
        if (src / "meta").is_dir():
            # re-split with the dataset's own split settings (new frames and labels join; an item's
            # split never changes): its test split stays out of training as the golden set
            dy = src / "data.yaml"
            prev = (yaml.safe_load(dy.read_text()) or {}).get("kozan_split", {}) if dy.exists() else {}
            split(src, val=prev.get("val", 0.2), test=prev.get("test", 0.0), seed=prev.get("seed", seed),
                  only_human=not include_prelabels)
        dy = src / "data.yaml" if src.is_dir() else src
        if not dy.exists():
            raise DatasetError(f"{src}: no data.yaml (run `kozan dataset split {src}` for a collected one)")
        data = yaml.safe_load(dy.read_text())
        base = Path(data.get("path") or dy.parent)
        bucket = coll if (src / "meta").is_dir() else syn
        for part in ("train", "val"):
            if data.get(part):
                bucket[part] += _images_of(data[part], base)
    if not coll["train"] and not syn["train"]:
        raise DatasetError("nothing to train on: no human-labelled collected frames and no synthetic images "
                           "(import corrected labels with `kozan dataset import`, or pass --include-prelabels)")
    syn_train = syn["train"]
    if synth_fraction is not None and coll["train"] and 0 <= synth_fraction < 1:
        keep = int(round(len(coll["train"]) * synth_fraction / (1 - synth_fraction)))
        if keep < len(syn_train):
            syn_train = [syn_train[i] for i in sorted(rng.choice(len(syn_train), keep, replace=False))]
    train = coll["train"] + syn_train
    val = coll["val"] or syn["val"]
    (out / "train.txt").write_text("".join(f"{p.resolve()}\n" for p in train))
    (out / "val.txt").write_text("".join(f"{p.resolve()}\n" for p in val))
    names = dict(enumerate(load_taxonomy().names))
    (out / "data.yaml").write_text(yaml.safe_dump({"path": str(out.resolve()), "train": "train.txt", "val": "val.txt",
                                                   "names": names}, sort_keys=False))
    manifest = {"sources": [str(s) for s in sources], "n_train": len(train), "n_val": len(val),
                "collected_train": len(coll["train"]), "synthetic_train": len(syn_train),
                "val_from": "collected" if coll["val"] else "synthetic",
                "fingerprint": list_fingerprint(train + val)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ---- labelling tools: export ----------------------------------------------------------------------------
def export_cvat(root: Path, out_zip: Path) -> int:
    """CVAT "YOLO 1.1" archive of every capture with its current labels (pre-labels or corrected)."""
    names = load_taxonomy().names
    caps = captures(root)
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out_zip, "w", zipfile.ZIP_STORED) as z:
        z.writestr("obj.names", "".join(f"{n}\n" for n in names))
        z.writestr("obj.data", f"classes = {len(names)}\ntrain = data/train.txt\nnames = data/obj.names\n"
                               "backup = backup/\n")
        z.writestr("train.txt", "".join(f"data/obj_train_data/{c['name']}.jpg\n" for c in caps))
        for c in caps:
            z.write(c["image"], f"obj_train_data/{c['name']}.jpg")
            z.writestr(f"obj_train_data/{c['name']}.txt", c["label"].read_text() if c["label"].exists() else "")
    return len(caps)


LS_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="label" toName="image">
{labels}
  </RectangleLabels>
</View>
"""


def export_labelstudio(root: Path, out_json: Path, image_prefix: str = "/data/local-files/?d=") -> int:
    """Label Studio tasks (the model's boxes as predictions) + `labeling_config.xml` beside them.

    `image_prefix` + the image's absolute path is each task's image URL: the default suits Label
    Studio's local-files storage; pass an http URL prefix when the images are served.
    """
    names = load_taxonomy().names
    tasks = []
    for c in captures(root):
        m = c["meta"]
        W, H = m.get("width"), m.get("height")
        if not W or not H:
            H, W = cv2.imread(str(c["image"])).shape[:2]
        scores = m.get("prelabel_scores", [])
        result = []
        pre = Path(root) / "prelabels" / f"{c['name']}.txt"     # the model's boxes, even after a correction
        rows = read_yolo(pre if pre.exists() else c["label"])
        for i, (cls, cx, cy, w, h) in enumerate(rows):
            result.append({"id": f"p{i}", "type": "rectanglelabels", "from_name": LS_FROM, "to_name": LS_TO,
                           "original_width": W, "original_height": H, "image_rotation": 0,
                           "value": {"x": (cx - w / 2) * 100, "y": (cy - h / 2) * 100, "width": w * 100,
                                     "height": h * 100, "rotation": 0, "rectanglelabels": [names[cls]]},
                           **({"score": scores[i]} if i < len(scores) else {})})
        tasks.append({"data": {"image": f"{image_prefix}{c['image'].resolve()}", "kozan_name": c["name"],
                               "reason": m.get("reason"), "track_id": m.get("track_id")},
                      "predictions": [{"model_version": m.get("model_version", "?"), "result": result,
                                       "score": float(np.mean(scores)) if scores else None}]})
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(tasks, indent=1))
    labels = "\n".join(f'    <Label value="{n}"/>' for n in names)
    (out_json.parent / "labeling_config.xml").write_text(LS_CONFIG.format(labels=labels))
    return len(tasks)


# ---- labelling tools: import ----------------------------------------------------------------------------
def _apply(root: Path, name: str, rows: list[tuple[int, float, float, float, float]], source: str) -> bool:
    root = Path(root)
    meta_p = root / "meta" / f"{name}.json"
    if not meta_p.exists():
        return False
    lab = root / "labels" / f"{name}.txt"
    pre = root / "prelabels" / f"{name}.txt"
    if lab.exists() and not pre.exists():
        pre.parent.mkdir(exist_ok=True)
        shutil.copy2(lab, pre)
    write_yolo(lab, rows)
    meta = json.loads(meta_p.read_text())
    meta["labels"] = "human"
    meta["labels_source"] = source
    meta_p.write_text(json.dumps(meta, indent=1))
    return True


def _class_map(their: list[str]) -> dict[int, int]:
    ours = load_taxonomy().names
    unknown = [n for n in their if n not in ours]
    if unknown:
        raise DatasetError(f"labels use classes {unknown} that the taxonomy does not have ({list(ours)}): "
                           "rename them in the labelling tool, or add them to datasets/taxonomy.yaml")
    return {i: ours.index(n) for i, n in enumerate(their)}


def import_labels(root: Path, src: Path) -> dict[str, Any]:
    """Corrected labels back into a collected dataset: a CVAT YOLO 1.1 zip, a Label Studio JSON
    export, or a folder of YOLO .txt files named like the captures."""
    src = Path(src)
    done, unknown = 0, []
    if src.suffix == ".zip":
        with zipfile.ZipFile(src) as z:
            files = z.namelist()
            names_file = next((f for f in files if f.endswith("obj.names")), None)
            if names_file is None:
                raise DatasetError(f"{src}: no obj.names: not a CVAT YOLO 1.1 export")
            cmap = _class_map([x.strip() for x in z.read(names_file).decode().splitlines() if x.strip()])
            for f in files:
                if f.endswith(".txt") and "obj_" in f and f.count("/") >= 1 and not f.endswith("train.txt"):
                    name = Path(f).stem
                    rows = [(cmap[int(p[0])], *map(float, p[1:])) for p in
                            (ln.split() for ln in z.read(f).decode().splitlines()) if len(p) == 5]
                    if _apply(root, name, rows, f"cvat:{src.name}"):
                        done += 1
                    else:
                        unknown.append(name)
        fmt = "cvat-yolo-1.1"
    elif src.suffix == ".json":
        tasks = json.loads(src.read_text())
        ours = load_taxonomy().names
        for t in tasks:
            name = t.get("data", {}).get("kozan_name") or Path(str(t.get("data", {}).get("image", ""))).stem
            anns = [a for a in t.get("annotations", []) if not a.get("was_cancelled")]
            if not anns:
                continue
            rows = []
            for r in anns[-1].get("result", []):
                if r.get("type") != "rectanglelabels":
                    continue
                v = r["value"]
                cls = v["rectanglelabels"][0]
                if cls not in ours:
                    raise DatasetError(f"{src}: task {name} uses class {cls!r}, unknown to the taxonomy {list(ours)}")
                x, y, w, h = v["x"] / 100, v["y"] / 100, v["width"] / 100, v["height"] / 100
                rows.append((ours.index(cls), x + w / 2, y + h / 2, w, h))
            if _apply(root, name, rows, f"labelstudio:{src.name}"):
                done += 1
            else:
                unknown.append(name)
        fmt = "label-studio-json"
    elif src.is_dir():
        for f in sorted(src.glob("*.txt")):
            if _apply(root, f.stem, read_yolo(f), f"yolo:{src}"):
                done += 1
            else:
                unknown.append(f.stem)
        fmt = "yolo-folder"
    else:
        raise DatasetError(f"{src}: expected a CVAT YOLO 1.1 .zip, a Label Studio .json export or a folder of .txt")
    return {"format": fmt, "imported": done, "not_in_dataset": unknown}


# ---- near duplicates ----------------------------------------------------------------------------------
def dhash(img: np.ndarray, size: int = 16) -> np.ndarray:
    """Difference hash: `size`x`size` bits from a grey, downscaled frame (robust to JPEG and light)."""
    g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    small = cv2.resize(g, (size + 1, size), interpolation=cv2.INTER_AREA).astype(np.int16)
    return (small[:, 1:] > small[:, :-1]).ravel()


def dedupe(root: Path, max_distance: float = 0.08, dry_run: bool = False) -> dict[str, Any]:
    """Move near-duplicate frames to `duplicates/` (kept, not deleted), keeping the first of each.

    Two frames are near-duplicates when their 256-bit difference hashes differ in at most
    `max_distance` of the bits. Human-labelled frames are preferred as the one kept.
    """
    root = Path(root)
    caps = captures(root)
    caps.sort(key=lambda c: (c["meta"].get("labels") != "human", c["name"]))
    hashes = []
    for c in caps:
        img = cv2.imread(str(c["image"]), cv2.IMREAD_REDUCED_GRAYSCALE_4)
        hashes.append(dhash(img))
    H = np.array(hashes, bool) if hashes else np.zeros((0, 256), bool)
    limit = int(max_distance * H.shape[1]) if len(H) else 0
    kept_idx: list[int] = []
    dups: list[tuple[str, str, int]] = []
    for i in range(len(caps)):
        if kept_idx:
            d = (H[kept_idx] != H[i]).sum(1)
            j = int(d.argmin())
            if d[j] <= limit:
                dups.append((caps[i]["name"], caps[kept_idx[j]]["name"], int(d[j])))
                continue
        kept_idx.append(i)
    if not dry_run:
        for name, _, _ in dups:
            for sub, ext in (("images", ".jpg"), ("labels", ".txt"), ("meta", ".json"), ("prelabels", ".txt")):
                p = root / sub / f"{name}{ext}"
                if p.exists():
                    (root / "duplicates" / sub).mkdir(parents=True, exist_ok=True)
                    shutil.move(str(p), root / "duplicates" / sub / p.name)
    return {"frames": len(caps), "duplicates": len(dups), "kept": len(kept_idx), "dry_run": dry_run,
            "pairs": [{"removed": a, "like": b, "bits": d} for a, b, d in dups[:50]]}
