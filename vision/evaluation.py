"""Detector evaluation through the station's own onnxruntime detector (no torch on this path).

`evaluate(model, data_yaml, split)` runs `vision.detector.Detector` — the same letterbox, session,
decode and NMS the station runs — over the images of one split of a YOLO dataset and reports:

- mAP50 and mAP50-95, COCO-style: detections at a low confidence floor (0.001), matched greedily in
  score order to the best-overlapping unmatched ground truth of the same class at each IoU threshold
  0.50:0.05:0.95, AP = mean of the interpolated precision at 101 recall points. All box sizes, up to
  the detector's `max_detections` per image (300 here, as ultralytics validates; COCO uses 100).
- per class: precision and recall at the station's operating threshold (IoU 0.5), AP50, AP50-95;
- a confusion matrix at the operating threshold, with a background row (detections of nothing)
  and a background column (missed items), as JSON and as a PNG drawn with OpenCV;
- false positives on frames with no target in them: the split's own label-free frames and, on
  request, frames rendered with distractors only (cables, plastic fragments, screws);
- the detector's latency per frame at the operating threshold (median / p99), thread count stated.

Greedy NMS keeps exactly the same boxes above the operating threshold whether it is run at 0.001 or
at that threshold (lower-scored boxes never suppress higher ones), so one pass at 0.001 serves both
the mAP and the operating-point figures.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import yaml

from vision.detections import Detections, box_iou
from vision.detector import Detector

log = logging.getLogger(__name__)

IOU_THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAP_CONF = 0.001
MAP_MAX_DET = 300
# recall by size: the short side of a true box at the model's input, in px. A stride-8 head sees an
# item under 8 px in one cell or none; cells and coin cells in the far view sit between 4 and 32 px
SIZE_EDGES_PX = (8, 16, 32)
SIZE_BINS = ("<8", "8-16", "16-32", ">=32")


class DatasetError(RuntimeError):
    """A dataset the evaluation cannot read; the message says what and where."""


# ----------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Sample:
    image: Path
    label: Path


def read_data_yaml(data_yaml: Path) -> dict:
    data_yaml = Path(data_yaml)
    if not data_yaml.exists():
        raise DatasetError(f"{data_yaml}: dataset YAML not found (give the data.yaml of a YOLO dataset)")
    data = yaml.safe_load(data_yaml.read_text(encoding="utf-8")) or {}
    if "names" not in data:
        raise DatasetError(f"{data_yaml}: no 'names' key; a YOLO dataset YAML names its classes")
    names = data["names"]
    data["names"] = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    root = Path(data.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root).resolve()
    if not root.exists() and (data_yaml.parent / "images").exists():
        root = data_yaml.parent.resolve()  # a moved dataset whose YAML still names the old place
    data["root"] = root
    return data


def _label_path(image: Path) -> Path:
    """ultralytics' rule: the last `/images/` in the path becomes `/labels/`, the suffix `.txt`."""
    s = Path(image).as_posix()
    i = s.rfind("/images/")
    if i < 0:
        raise DatasetError(f"{image}: not under an 'images' folder, so its label file cannot be found")
    return Path(s[:i] + "/labels/" + s[i + 8:]).with_suffix(".txt")


def split_samples(data_yaml: Path, split: str = "test") -> tuple[list[Sample], list[str]]:
    """The images of one split (a folder, a list of folders, or a .txt list) and the class names."""
    data = read_data_yaml(data_yaml)
    if split not in data or not data[split]:
        have = [k for k in ("train", "val", "test") if data.get(k)]
        raise DatasetError(f"{data_yaml}: no '{split}' split; it has {have}")
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    images: list[Path] = []
    for e in entries:
        p = Path(e)
        p = p if p.is_absolute() else data["root"] / p
        if p.is_dir():
            images += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix == ".txt" and p.exists():
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    images.append(q if q.is_absolute() else (data["root"] / q))
        else:
            raise DatasetError(f"{data_yaml}: split '{split}' names {p}, which is neither a folder nor a .txt list")
    if not images:
        raise DatasetError(f"{data_yaml}: split '{split}' has no images")
    return [Sample(im, _label_path(im)) for im in images], data["names"]


def read_labels(label: Path, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(boxes xyxy px (N,4) float32, class ids (N,) int32); a missing file means no objects."""
    if not label.exists():
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
    rows = [l.split() for l in label.read_text().splitlines() if l.strip()]
    if not rows:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
    try:
        a = np.asarray([[float(v) for v in r[:5]] for r in rows], np.float64)
    except ValueError as e:
        raise DatasetError(f"{label}: unreadable label line ({e})") from None
    if a.shape[1] != 5:
        raise DatasetError(f"{label}: each line must be 'class cx cy w h' (normalised)")
    cx, cy, w, h = a[:, 1] * width, a[:, 2] * height, a[:, 3] * width, a[:, 4] * height
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)
    return boxes, a[:, 0].astype(np.int32)


# -------------------------------------------------------------------------------------- metrics

def match_coco(pred_boxes: np.ndarray, pred_scores: np.ndarray, pred_cls: np.ndarray,
               gt_boxes: np.ndarray, gt_cls: np.ndarray,
               thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """(len(preds), len(thresholds)) bool: true positive at each IoU threshold.

    COCO's rule: per class, detections in descending score order each take the unmatched ground
    truth of their class with the highest IoU, if that IoU reaches the threshold.
    """
    tp = np.zeros((len(pred_boxes), len(thresholds)), bool)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return tp
    iou = box_iou(pred_boxes, gt_boxes)
    iou[pred_cls[:, None] != gt_cls[None, :]] = 0.0
    candidates = np.flatnonzero(iou.max(1) >= thresholds[0])   # the rest miss at every threshold
    if candidates.size == 0:
        return tp
    candidates = candidates[np.argsort(-pred_scores[candidates], kind="stable")]
    for k, t in enumerate(thresholds):
        taken = np.zeros(len(gt_boxes), bool)
        for i in candidates:
            row = np.where(taken, -1.0, iou[i])
            j = int(row.argmax())
            if row[j] >= t:
                taken[j] = True
                tp[i, k] = True
    return tp


def average_precision(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> np.ndarray:
    """AP per IoU threshold (columns of `tp`) with COCO's 101-point interpolation; NaN with no ground truth."""
    if n_gt == 0:
        return np.full(tp.shape[1], np.nan)
    if len(scores) == 0:
        return np.zeros(tp.shape[1])
    order = np.argsort(-scores, kind="mergesort")   # COCO sorts with mergesort
    tp = tp[order]
    tpc = np.cumsum(tp, 0, dtype=np.float64)
    fpc = np.cumsum(~tp, 0, dtype=np.float64)
    recall = tpc / n_gt
    precision = tpc / (tpc + fpc)
    ap = np.zeros(tp.shape[1])
    for k in range(tp.shape[1]):
        env = np.maximum.accumulate(precision[::-1, k])[::-1]    # precision envelope
        idx = np.searchsorted(recall[:, k], RECALL_POINTS, side="left")
        q = np.where(idx < len(env), env[np.minimum(idx, len(env) - 1)], 0.0)
        ap[k] = q.mean()
    return ap


def match_operating(pred_boxes: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """For each true box, the index of the detection matched to it, or -1. Class-agnostic, highest
    IoU first: the confusion matrix's matching, which recall by size counts with too."""
    match = np.full(len(gt_boxes), -1, np.int64)
    if len(gt_boxes) == 0 or len(pred_boxes) == 0:
        return match
    iou = box_iou(gt_boxes, pred_boxes)
    gi, pi = np.nonzero(iou >= iou_threshold)
    used_p: set[int] = set()
    for k in np.argsort(-iou[gi, pi], kind="stable"):
        g, p = int(gi[k]), int(pi[k])
        if match[g] >= 0 or p in used_p:
            continue
        match[g] = p
        used_p.add(p)
    return match


def confusion_update(cm: np.ndarray, pred_boxes: np.ndarray, pred_cls: np.ndarray,
                     gt_boxes: np.ndarray, gt_cls: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """Rows: true class (last row: background = a detection of nothing); columns: predicted class
    (last column: background = a missed item). Returns `match_operating`'s matches."""
    bg = cm.shape[0] - 1
    match = match_operating(pred_boxes, gt_boxes, iou_threshold)
    for g, p in enumerate(match):
        cm[gt_cls[g], pred_cls[p] if p >= 0 else bg] += 1
    for p in np.setdiff1d(np.arange(len(pred_boxes)), match[match >= 0]):
        cm[bg, pred_cls[p]] += 1
    return match


def size_bins(gt_boxes: np.ndarray, scale: float) -> np.ndarray:
    """Each true box's SIZE_BINS index: its short side in px at the model's input (image px x `scale`)."""
    short = np.minimum(gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1]) * scale
    return np.digitize(short, SIZE_EDGES_PX)


def draw_confusion_matrix(cm: np.ndarray, names: list[str], title: str = "") -> np.ndarray:
    """A BGR image of the matrix, each row shaded by its share of that true class."""
    labels = list(names) + ["background"]
    n = len(labels)
    cell, left, top = 64, 170, 170
    font, fs = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    img = np.full((top + n * cell + 40, left + n * cell + 20, 3), 255, np.uint8)
    rows = cm.sum(1, keepdims=True).astype(np.float64)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    for r in range(n):
        for c in range(n):
            x0, y0 = left + c * cell, top + r * cell
            v = share[r, c]
            shade = (255 - 200 * v, 255 - 120 * v, 255 - 30 * v) if r == c else (255 - 30 * v, 255 - 120 * v, 255 - 200 * v)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), tuple(int(s) for s in shade), -1)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (180, 180, 180), 1)
            if cm[r, c]:
                txt = str(int(cm[r, c]))
                (tw, th), _ = cv2.getTextSize(txt, font, fs, 1)
                cv2.putText(img, txt, (x0 + (cell - tw) // 2, y0 + (cell + th) // 2), font, fs, (0, 0, 0), 1,
                            cv2.LINE_AA)
        (tw, th), _ = cv2.getTextSize(labels[r], font, fs, 1)
        cv2.putText(img, labels[r], (left - tw - 8, top + r * cell + (cell + th) // 2), font, fs, (0, 0, 0), 1,
                    cv2.LINE_AA)
    # column labels: written horizontally on a strip, then turned upright
    strip = np.full((n * cell, top - 30, 3), 255, np.uint8)
    for c in range(n):
        (tw, th), _ = cv2.getTextSize(labels[c], font, fs, 1)
        cv2.putText(strip, labels[c], (8, c * cell + (cell + th) // 2), font, fs, (0, 0, 0), 1, cv2.LINE_AA)
    strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
    img[0:top - 30, left:left + n * cell] = strip
    cv2.putText(img, "true (rows) / predicted (columns)", (8, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if title:
        cv2.putText(img, title, (8, img.shape[0] - 14), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return img


# ------------------------------------------------------------------------------ distractor frames

def render_distractor_frames(n: int, seed: int = 7_000_001, width: int | None = None) -> Iterator[np.ndarray]:
    """Frames with only distractors on the belt, under the held-out test set's shifted settings,
    stored the way the dataset writer stores its images (downscaled with INTER_AREA, JPEG q93)."""
    from vision.datasets import STORE_WIDTH
    from vision.render.synth import SynthSettings, render_scene, resize_for_storage, shifted_settings

    cfg = shifted_settings(SynthSettings())
    cfg.distractor_p = 1.0
    cfg.empty_frame_p = 0.0
    cfg.attach_battery_p = 0.0
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img, labels = render_scene(rng, cfg)
        if labels:  # cannot happen with distractor_p=1; guard the premise rather than trust it
            raise RuntimeError(f"distractor-only frame {i} has target labels {labels}")
        img, _ = resize_for_storage(img, [], width or STORE_WIDTH)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 93])
        yield cv2.imdecode(buf, cv2.IMREAD_COLOR)


# ------------------------------------------------------------------------------------ evaluation

@dataclass
class EvalConfig:
    split: str = "test"
    conf_threshold: float = 0.25        # the station's operating threshold
    iou_threshold: float = 0.5          # the station's NMS IoU
    threads: int = 2                    # onnxruntime intra-op threads (the station's default)
    match_iou: float = 0.5              # IoU for precision/recall and the confusion matrix
    distractor_frames: int = 0
    distractor_seed: int = 7_000_001
    limit: int | None = None            # first N images only (quick looks)
    warmup: int = 5


@dataclass
class _ClassAcc:
    scores: list[np.ndarray] = field(default_factory=list)
    tp: list[np.ndarray] = field(default_factory=list)
    n_gt: int = 0


def _fp_summary(counts: list[np.ndarray], names: list[str]) -> dict:
    n = len(counts)
    per_frame = np.asarray([len(c) for c in counts])
    per_class = np.zeros(len(names), int)
    for c in counts:
        if len(c):
            per_class += np.bincount(c, minlength=len(names))
    return {"frames": n,
            "frames_with_detection": int((per_frame > 0).sum()),
            "fp_frame_rate": round(float((per_frame > 0).mean()), 4) if n else None,
            "detections": int(per_frame.sum()),
            "detections_per_frame": round(float(per_frame.mean()), 4) if n else None,
            "by_class": {names[i]: int(v) for i, v in enumerate(per_class) if v}}


def map_detector(model: str | Path, cfg: EvalConfig) -> Detector:
    """The station's detector set up as COCO and ultralytics count mAP (every box down to 0.001)."""
    return Detector(model, conf_threshold=MAP_CONF, iou_threshold=cfg.iou_threshold, threads=cfg.threads,
                    max_detections=MAP_MAX_DET, agnostic_nms=False)


def split_for(det: Detector, data_yaml: str | Path, cfg: EvalConfig) -> list[Sample]:
    """The samples of `cfg.split`, refused unless the data's classes are the model's."""
    samples, data_names = split_samples(Path(data_yaml), cfg.split)
    names = list(det.names)
    if data_names != names:
        raise DatasetError(f"{data_yaml}: the dataset's classes {data_names} are not the model's {names} "
                           "(same names, same order); evaluate a model on data of its own taxonomy")
    return samples[: cfg.limit] if cfg.limit else samples


def matched_images(det: Detector, samples: list[Sample]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                            Detections, np.ndarray]]:
    """Each sample read, its labels checked, detected and matched: (image, ground-truth boxes and
    classes, detections, COCO true-positive matrix). One loop for `evaluate` and for benches that
    need the per-image figures (bench/golden_noise.py resamples images)."""
    nc = len(det.names)
    for s in samples:
        img = cv2.imread(str(s.image), cv2.IMREAD_COLOR)
        if img is None:
            raise DatasetError(f"{s.image}: OpenCV cannot read this image")
        H, W = img.shape[:2]
        gt_boxes, gt_cls = read_labels(s.label, W, H)
        if len(gt_cls) and (gt_cls.min() < 0 or gt_cls.max() >= nc):
            raise DatasetError(f"{s.label}: class id out of range 0..{nc - 1}")
        d = det(img)
        yield img, gt_boxes, gt_cls, d, match_coco(d.boxes, d.scores, d.class_ids, gt_boxes, gt_cls)


def evaluate(model: str | Path, data_yaml: str | Path, cfg: EvalConfig | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict:
    cfg = cfg or EvalConfig()
    det = map_detector(model, cfg)
    samples = split_for(det, data_yaml, cfg)
    names = list(det.names)
    nc = len(names)
    acc = [_ClassAcc() for _ in range(nc)]
    cm = np.zeros((nc + 1, nc + 1), np.int64)
    op_tp = np.zeros(nc, np.int64)
    op_fp = np.zeros(nc, np.int64)
    label_free: list[np.ndarray] = []
    by_size = np.zeros((3, nc, len(SIZE_BINS)), np.int64)     # instances, found, found as the right class
    images: list[np.ndarray] = []
    sizes: set[tuple[int, int]] = set()
    for k, (img, gt_boxes, gt_cls, d, tp) in enumerate(matched_images(det, samples)):
        sizes.add(img.shape[:2])
        for c in range(nc):
            m = d.class_ids == c
            acc[c].scores.append(d.scores[m])
            acc[c].tp.append(tp[m])
            acc[c].n_gt += int((gt_cls == c).sum())
        op = d.scores > cfg.conf_threshold
        # P/R at the operating point: COCO matching is greedy in score order, so the matches of the
        # detections above the threshold are the same as if the ones below had never existed
        op_hit = tp[op, 0]
        np.add.at(op_tp, d.class_ids[op][op_hit], 1)
        np.add.at(op_fp, d.class_ids[op][~op_hit], 1)
        match = confusion_update(cm, d.boxes[op], d.class_ids[op], gt_boxes, gt_cls, cfg.match_iou)
        _count_by_size(by_size, match, d.class_ids[op], gt_boxes, gt_cls,
                       min(det.info.input_hw[0] / img.shape[0], det.info.input_hw[1] / img.shape[1]))
        if len(gt_cls) == 0:
            label_free.append(d.class_ids[op])
        if len(images) < 300:  # enough frames for a latency median and p99
            images.append(img)
        if progress:
            progress(k + 1, len(samples))

    per_class = {}
    ap = np.zeros((nc, len(IOU_THRESHOLDS)))
    for c in range(nc):
        scores = np.concatenate(acc[c].scores) if acc[c].scores else np.zeros(0)
        tps = np.concatenate(acc[c].tp) if acc[c].tp else np.zeros((0, len(IOU_THRESHOLDS)), bool)
        ap[c] = average_precision(tps, scores, acc[c].n_gt)
        n_gt = acc[c].n_gt
        tp_c, fp_c = int(op_tp[c]), int(op_fp[c])
        per_class[names[c]] = {
            "instances": n_gt,
            "precision": round(tp_c / (tp_c + fp_c), 4) if tp_c + fp_c else None,
            "recall": round(tp_c / n_gt, 4) if n_gt else None,
            "ap50": None if np.isnan(ap[c, 0]) else round(float(ap[c, 0]), 4),
            "ap50_95": None if np.isnan(ap[c, 0]) else round(float(ap[c].mean()), 4),
        }
    have = ~np.isnan(ap[:, 0])
    n_gt_all = sum(a.n_gt for a in acc)
    tp_all, fp_all = int(op_tp.sum()), int(op_fp.sum())

    # distractor-only frames rendered with the project's renderer
    rendered: list[np.ndarray] = []
    if cfg.distractor_frames:
        det.conf = cfg.conf_threshold
        for img in render_distractor_frames(cfg.distractor_frames, cfg.distractor_seed,
                                            width=max(w for _, w in sizes)):
            rendered.append(det(img).class_ids)

    latency = measure_latency(det, images, cfg.conf_threshold, cfg.warmup)
    report = {
        "model": str(model), "model_version": det.info.version, "input_hw": list(det.info.input_hw),
        "data": str(data_yaml), "split": cfg.split, "images": len(samples),
        "image_sizes": sorted([list(s) for s in sizes]),
        "settings": {"map_conf": MAP_CONF, "max_detections": MAP_MAX_DET, "nms_iou": cfg.iou_threshold,
                     "operating_conf": cfg.conf_threshold, "match_iou": cfg.match_iou,
                     "iou_thresholds": IOU_THRESHOLDS.tolist(), "ap_interpolation": "COCO 101-point"},
        "map50": round(float(ap[have, 0].mean()), 4) if have.any() else None,
        "map50_95": round(float(ap[have].mean()), 4) if have.any() else None,
        "instances": n_gt_all,
        "precision": round(tp_all / (tp_all + fp_all), 4) if tp_all + fp_all else None,
        "recall": round(tp_all / n_gt_all, 4) if n_gt_all else None,
        "per_class": per_class,
        "recall_by_size": _recall_by_size(by_size, names, cfg),
        "confusion_matrix": {"labels": names + ["background"], "rows": "true", "columns": "predicted",
                             "conf": cfg.conf_threshold, "iou": cfg.match_iou, "matrix": cm.tolist()},
        "false_positives": {
            "label_free_frames_in_split": _fp_summary(label_free, names),
            "rendered_distractor_only_frames": (_fp_summary(rendered, names) | {"seed": cfg.distractor_seed})
            if cfg.distractor_frames else None,
        },
        "latency": latency,
    }
    return report


def _count_by_size(by_size: np.ndarray, match: np.ndarray, pred_cls: np.ndarray, gt_boxes: np.ndarray,
                   gt_cls: np.ndarray, scale: float) -> None:
    b = size_bins(gt_boxes, scale)
    found = match >= 0
    right = found & (pred_cls[np.maximum(match, 0)] == gt_cls) if len(pred_cls) else found
    for k, m in enumerate((np.ones_like(found), found, right)):
        np.add.at(by_size[k], (gt_cls[m], b[m]), 1)


def _recall_by_size(by_size: np.ndarray, names: list[str], cfg: EvalConfig) -> dict:
    """Why a report needs it: mAP says how much is missed, not whether the misses are the items too
    small for the input (a resolution limit) or items of any size (a training limit)."""
    def rows(n: np.ndarray, found: np.ndarray, right: np.ndarray) -> dict:
        share = lambda a: [round(float(x / m), 4) if m else None for x, m in zip(a, n)]  # noqa: E731
        return {"instances": n.tolist(), "found": share(found), "right_class": share(right)}

    n, found, right = by_size
    return {"measure": "short side of the true box at the model's input, px", "bins": list(SIZE_BINS),
            "conf": cfg.conf_threshold, "iou": cfg.match_iou,
            "per_class": {name: rows(n[c], found[c], right[c]) for c, name in enumerate(names)},
            "all": rows(n.sum(0), found.sum(0), right.sum(0))}


def measure_latency(det: Detector, images: list[np.ndarray], conf: float, warmup: int = 5) -> dict:
    """Per-frame time of the whole station detector (letterbox + run + decode + NMS) at the
    operating threshold, and of the bare `session.run` on the prepared tensor, interleaved so that
    both see the same machine load."""
    if not images:
        return {}
    det.conf = conf
    name = det.session.get_inputs()[0].name
    for im in images[:warmup]:
        det(im)
    full, raw = [], []
    for im in images:
        t0 = time.perf_counter()
        det(im)
        t1 = time.perf_counter()
        det.session.run(None, {name: det._tensor})
        t2 = time.perf_counter()
        full.append(t1 - t0)
        raw.append(t2 - t1)
    full_ms, raw_ms = np.asarray(full) * 1e3, np.asarray(raw) * 1e3
    so = det.session.get_session_options()
    return {"frames": len(images),
            "detector_median_ms": round(float(np.median(full_ms)), 2),
            "detector_p99_ms": round(float(np.percentile(full_ms, 99)), 2),
            "session_run_median_ms": round(float(np.median(raw_ms)), 2),
            "session_run_p99_ms": round(float(np.percentile(raw_ms, 99)), 2),
            "threads": {"onnxruntime_intra_op": so.intra_op_num_threads,
                        "onnxruntime_inter_op": so.inter_op_num_threads, "onnxruntime_spin": det.spin,
                        "opencv": cv2.getNumThreads()}}


def write_report(report: dict, out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / "eval.json", "confusion_json": out / "confusion_matrix.json",
             "confusion_png": out / "confusion_matrix.png"}
    paths["report"].write_text(json.dumps(report, indent=1))
    paths["confusion_json"].write_text(json.dumps(report["confusion_matrix"], indent=1))
    cmr = report["confusion_matrix"]
    img = draw_confusion_matrix(np.asarray(cmr["matrix"]), cmr["labels"][:-1],
                                f"{report['model_version']} on {Path(report['data']).parent.name}/{report['split']}, "
                                f"conf>{cmr['conf']}, IoU>={cmr['iou']}")
    if not cv2.imwrite(str(paths["confusion_png"]), img):
        raise OSError(f"{paths['confusion_png']}: could not write the PNG")
    return paths


def format_report(r: dict) -> str:
    lines = [f"{r['model_version']} ({r['input_hw'][0]}x{r['input_hw'][1]}) on {r['data']} [{r['split']}], "
             f"{r['images']} images, {r['instances']} instances",
             f"mAP50 {r['map50']}  mAP50-95 {r['map50_95']}  (COCO 101-point, conf>={MAP_CONF})  "
             f"P {r['precision']}  R {r['recall']}  (at conf>{r['settings']['operating_conf']}, IoU 0.5)",
             f"{'class':<14}{'inst':>6}{'P':>8}{'R':>8}{'AP50':>8}{'AP50-95':>9}"]
    for name, c in r["per_class"].items():
        def f(v):
            return "-" if v is None else f"{v:.3f}"
        lines.append(f"{name:<14}{c['instances']:>6}{f(c['precision']):>8}{f(c['recall']):>8}"
                     f"{f(c['ap50']):>8}{f(c['ap50_95']):>9}")
    rs = r.get("recall_by_size")
    if rs:
        lines.append(f"recall by size: the true box's short side at the model's input; instances: found / right "
                     f"class (conf>{rs['conf']}, IoU {rs['iou']})")
        lines.append(f"{'class':<14}" + "".join(f"{b + ' px':>19}" for b in rs["bins"]))
        for name, row in [*rs["per_class"].items(), ("all", rs["all"])]:
            cells = [f"{n}: {found:.2f} / {right:.2f}" if n else "-"
                     for n, found, right in zip(row["instances"], row["found"], row["right_class"])]
            lines.append(f"{name:<14}" + "".join(f"{c:>19}" for c in cells))
    for k, v in r["false_positives"].items():
        if v:
            lines.append(f"{k}: {v['frames_with_detection']}/{v['frames']} frames with a detection "
                         f"(rate {v['fp_frame_rate']}), {v['detections']} detections {v['by_class']}")
    lat = r["latency"]
    if lat:
        sizes = r["image_sizes"]   # crop sets have hundreds of sizes: name the range, the JSON keeps them all
        shown = sizes if len(sizes) <= 3 else f"{len(sizes)} sizes, {sizes[0]} to {sizes[-1]}"
        lines.append(f"latency per frame ({lat['frames']} frames, {shown}): detector median "
                     f"{lat['detector_median_ms']} ms p99 {lat['detector_p99_ms']} ms; session.run median "
                     f"{lat['session_run_median_ms']} ms p99 {lat['session_run_p99_ms']} ms; threads {lat['threads']}")
    return "\n".join(lines)
