"""Evaluation: the metric maths on hand-made cases, and a whole eval of the shipped model on a tiny
rendered dataset through the station's onnxruntime detector (no torch)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from vision.evaluation import (
    EvalConfig, average_precision, box_iou, confusion_update, evaluate, match_coco, render_distractor_frames,
    size_bins,
    split_samples, write_report,
)

REPO = Path(__file__).resolve().parents[2]


def _b(*rows):
    return np.asarray(rows, np.float32).reshape(-1, 4)


# ------------------------------------------------------------------------------------ the maths

def test_perfect_detections_score_one():
    gt = _b([0, 0, 10, 10], [20, 20, 40, 40])
    tp = match_coco(gt, np.array([0.9, 0.8]), np.array([0, 0]), gt, np.array([0, 0]))
    assert tp.all()
    assert np.allclose(average_precision(tp, np.array([0.9, 0.8]), 2), 1.0)


def test_a_false_positive_ranked_first_costs_precision_exactly():
    gt = _b([0, 0, 10, 10], [20, 20, 40, 40])
    preds = _b([0, 0, 10, 10], [100, 100, 110, 110], [20, 20, 40, 40])
    scores = np.array([0.9, 0.8, 0.7])
    tp = match_coco(preds, scores, np.zeros(3, int), gt, np.zeros(2, int))
    assert tp[:, 0].tolist() == [True, False, True]
    # recall 0..0.5 at precision 1 (51 points), 0.51..1 at precision 2/3 (50 points)
    assert average_precision(tp, scores, 2)[0] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_iou_thresholds_and_duplicates():
    gt = _b([0, 0, 100, 100])
    # IoU 0.62: a hit at 0.50, 0.55, 0.60 and a miss from 0.65 up; the duplicate is a false positive everywhere
    shifted = _b([0, 0, 100, 62])
    assert box_iou(shifted, gt)[0, 0] == pytest.approx(0.62)
    preds = np.concatenate([shifted, _b([0, 0, 100, 61])])
    tp = match_coco(preds, np.array([0.9, 0.5]), np.array([1, 1]), gt, np.array([1]))
    assert tp[0].tolist() == [True] * 3 + [False] * 7
    assert not tp[1].any()
    assert average_precision(tp, np.array([0.9, 0.5]), 1).mean() == pytest.approx(0.3)
    # the right box with the wrong class is no hit at all
    assert not match_coco(gt, np.array([0.9]), np.array([0]), gt, np.array([1])).any()


def test_ap_without_detections_is_zero_and_without_ground_truth_undefined():
    assert average_precision(np.zeros((0, 10), bool), np.zeros(0), 3).tolist() == [0.0] * 10
    assert np.isnan(average_precision(np.zeros((2, 10), bool), np.array([0.5, 0.4]), 0)).all()


def test_confusion_matrix_has_background_row_and_column():
    cm = np.zeros((3, 3), int)   # two classes + background
    gt = _b([0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 120, 120])
    gt_cls = np.array([0, 1, 1])
    pred = _b([0, 0, 10, 10], [50, 50, 60, 61], [200, 200, 210, 210])
    pred_cls = np.array([0, 0, 1])
    confusion_update(cm, pred, pred_cls, gt, gt_cls)
    assert cm.tolist() == [[1, 0, 0],     # class 0 found as 0
                           [1, 0, 1],     # class 1 once taken for 0, once missed
                           [0, 1, 0]]     # a class-1 detection of nothing


def test_size_bins_take_the_short_side_at_the_models_input():
    boxes = _b([0, 0, 5, 50], [0, 0, 100, 10], [0, 0, 20, 30], [0, 0, 40, 40], [0, 0, 16, 16])
    assert size_bins(boxes, 1.0).tolist() == [0, 1, 2, 3, 2]     # <8, 8-16, 16-32, >=32; 16 is 16-32
    assert size_bins(boxes, 0.5).tolist() == [0, 0, 1, 2, 1]     # the same boxes in a half-size input


# ------------------------------------------------------------------------------- a whole eval

@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    from vision.datasets import write_synth_dataset

    out = tmp_path_factory.mktemp("tiny-eval")
    write_synth_dataset(out, n=0, seed=5, test_n=8, workers=1)
    return out / "data.yaml"


@pytest.fixture(scope="module")
def report(tiny_dataset, shipped_model) -> dict:
    return evaluate(shipped_model, tiny_dataset, EvalConfig(split="test", distractor_frames=2, warmup=1))


def test_eval_of_the_shipped_model_on_rendered_data(report):
    assert report["images"] == 8 and report["instances"] > 10
    # det-v1 reaches ~0.9 mAP50 on the held-out set: a working eval of it cannot land near zero
    assert report["map50"] > 0.6, report["map50"]
    assert 0 < report["map50_95"] < report["map50"]
    per = report["per_class"]
    assert sum(c["instances"] for c in per.values()) == report["instances"]
    cm = np.asarray(report["confusion_matrix"]["matrix"])
    assert cm.shape == (9, 9)
    # every labelled item lands exactly once in its true row: found as some class, or missed
    assert cm[:-1].sum() == report["instances"]
    assert np.trace(cm[:-1, :-1]) >= 0.6 * report["instances"]
    # recall by size counts with the confusion matrix's matching: per class, the items found are the
    # row's items not missed, the right-class ones its diagonal
    rs = report["recall_by_size"]
    assert rs["bins"] == ["<8", "8-16", "16-32", ">=32"]
    for c, (name, row) in enumerate(rs["per_class"].items()):
        n = np.asarray(row["instances"])
        found = sum(round(f * k) for f, k in zip(row["found"], n) if k)
        right = sum(round(f * k) for f, k in zip(row["right_class"], n) if k)
        assert n.sum() == per[name]["instances"]
        assert (found, right) == (cm[c, :-1].sum(), cm[c, c]), name
    assert sum(rs["all"]["instances"]) == report["instances"]
    fp = report["false_positives"]["rendered_distractor_only_frames"]
    assert fp["frames"] == 2 and 0.0 <= fp["fp_frame_rate"] <= 1.0
    lat = report["latency"]
    assert lat["detector_median_ms"] > 0 and lat["threads"]["onnxruntime_intra_op"] == 2


def test_wrong_labels_score_low(tiny_dataset, shipped_model, tmp_path, report):
    """The same images with every class id moved by one: a real eval must collapse."""
    import shutil

    root = tiny_dataset.parent
    bad = tmp_path / "bad"
    shutil.copytree(root / "images", bad / "images")
    for p in (root / "labels" / "test").glob("*.txt"):
        lines = [l.split() for l in p.read_text().splitlines() if l.strip()]
        out = bad / "labels" / "test" / p.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(f"{(int(l[0]) + 1) % 8} {' '.join(l[1:])}\n" for l in lines))
    import yaml

    data = yaml.safe_load(tiny_dataset.read_text())
    data["path"] = str(bad)
    (bad / "data.yaml").write_text(yaml.safe_dump(data))
    r = evaluate(shipped_model, bad / "data.yaml", EvalConfig(split="test", warmup=0))
    assert r["instances"] == report["instances"]
    assert r["map50"] < 0.3 * report["map50"], (r["map50"], report["map50"])


def test_report_files(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    data = json.loads(paths["report"].read_text())
    assert data["map50"] == report["map50"]
    assert json.loads(paths["confusion_json"].read_text())["labels"][-1] == "background"
    png = cv2.imread(str(paths["confusion_png"]))
    assert png is not None and png.shape[0] > 500 and png.shape[1] > 500


def test_split_listing_follows_ultralytics_layout(tiny_dataset):
    samples, names = split_samples(tiny_dataset, "test")
    assert len(samples) == 8 and names[0] == "board_high"
    assert all(s.label.parent.name == "test" and s.label.parent.parent.name == "labels" for s in samples)
    with pytest.raises(Exception, match="no 'train' split|has no images"):
        split_samples(tiny_dataset, "train")


def test_distractor_frames_have_no_targets_but_do_have_objects():
    frames = list(render_distractor_frames(2, seed=11))
    assert len(frames) == 2 and frames[0].shape[1] == 640
    assert not np.array_equal(frames[0], frames[1])


def test_eval_command_never_imports_torch(tiny_dataset, shipped_model, tmp_path):
    code = (
        "import sys\n"
        "from station.cli import main\n"
        f"rc = main(['model', 'eval', {str(shipped_model)!r}, {str(tiny_dataset)!r}, '--limit', '2',"
        f" '--out', {str(tmp_path / 'ev')!r}])\n"
        "heavy = sorted(m for m in ('torch', 'ultralytics', 'torchvision') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc or (3 if heavy else 0))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "HEAVY []" in p.stdout
    assert "mAP50" in p.stdout
    assert (tmp_path / "ev" / "confusion_matrix.png").exists()
