"""`kozan dataset`: stats, split, merge, the CVAT and Label Studio round trips, near-duplicate removal."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from station.alarms import AlarmBoard
from station.capture import Capture
from station.config import CaptureConfig
from station.sorting import Reason
from tests.loop.test_capture import NAMES, _decision
from vision import dataset_tools as dt
from vision.detections import Detections
from vision.frame import Frame


def _scene(k: int) -> np.ndarray:
    """A distinct frame per k: a textured belt and a bright item somewhere."""
    rng = np.random.default_rng(k)
    img = cv2.resize(rng.integers(0, 255, (9, 16, 3), dtype=np.uint8), (320, 180), interpolation=cv2.INTER_LINEAR)
    x = 20 + (k * 37) % 250
    cv2.rectangle(img, (x, 60), (x + 40, 100), (255, 255, 255), -1)
    return img


def make_collected(root: Path, n: int = 6, dup_of: dict[int, int] | None = None) -> Capture:
    # a fixed run id: the split hashes (run, track), and a random id left 10 frames all in train in
    # about 3 % of runs (0.7 ** 10): CI saw it once
    cap = Capture(CaptureConfig(enabled=True, random_rate=0.0, max_per_min=6000), root, NAMES, AlarmBoard(),
                  lambda: "det-test", wait_for_writer=True, run_id="r0test")
    from types import SimpleNamespace

    for k in range(1, n + 1):
        src = (dup_of or {}).get(k, k)
        img = _scene(src)
        if src != k:   # a near-copy: a little noise
            img = np.clip(img.astype(int) + np.random.default_rng(k).integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        det = Detections(np.array([[20 + (src * 37) % 250, 60, 60 + (src * 37) % 250, 100]], np.float32),
                         np.array([0.4], np.float32), np.array([5], np.int32))   # the model says nimh
        cap.on_frame(SimpleNamespace(frame=Frame(k, k * 10**9, img, k), detections=det,
                                     decisions=[_decision(k, cls="nimh", conf=0.4, b=0, reason=Reason.LOW_CONFIDENCE)]))
    cap.close()
    return cap


def test_stats_split_keeps_an_items_frames_together(tmp_path):
    root = tmp_path / "col"
    make_collected(root, 10)
    s = dt.stats(root)
    assert s["frames"] == 10 and s["per_reason"] == {"manual": 10, "low_confidence": 10}
    assert s["boxes_per_class"] == {"nimh": 10} and s["per_model"] == {"det-test": 10} and len(s["per_day"]) == 1
    counts = dt.split(root, val=0.3, seed=1)
    assert sum(counts.values()) == 10 and counts["val"] >= 1 and counts["train"] >= 1
    data = yaml.safe_load((root / "data.yaml").read_text())
    assert data["names"][5] == "nimh" and (root / data["val"]).exists()
    assert dt.split(root, val=0.3, seed=1) == counts            # deterministic


def test_cvat_round_trip_replaces_prelabels_with_corrections(tmp_path):
    root = tmp_path / "col"
    make_collected(root, 4)
    z = tmp_path / "cvat.zip"
    assert dt.export_cvat(root, z) == 4
    with zipfile.ZipFile(z) as zf:
        files = set(zf.namelist())
        assert {"obj.names", "obj.data", "train.txt"} <= files
        assert zf.read("obj.names").decode().split() == list(NAMES)
        txts = sorted(f for f in files if f.startswith("obj_train_data/") and f.endswith(".txt"))
        assert len(txts) == 4 and zf.read(txts[0]).decode().startswith("5 ")
    # the labeller: every nimh was really an alkaline (class 4); one frame gets a second box
    fixed = tmp_path / "fixed.zip"
    with zipfile.ZipFile(z) as zin, zipfile.ZipFile(fixed, "w") as zout:
        for f in zin.namelist():
            data = zin.read(f)
            if f in txts:
                data = data.decode().replace("5 ", "4 ", 1).encode()
                if f == txts[0]:
                    data += b"2 0.500000 0.500000 0.100000 0.100000\n"
            zout.writestr(f, data)
    r = dt.import_labels(root, fixed)
    assert r == {"format": "cvat-yolo-1.1", "imported": 4, "not_in_dataset": []}
    name = Path(txts[0]).stem
    rows = dt.read_yolo(root / "labels" / f"{name}.txt")
    assert [c for c, *_ in rows] == [4, 2]
    assert dt.read_yolo(root / "prelabels" / f"{name}.txt")[0][0] == 5          # the model's guess is kept
    assert json.loads((root / "meta" / f"{name}.json").read_text())["labels"] == "human"
    assert dt.stats(root)["labels"] == {"human": 4}


def test_label_studio_round_trip(tmp_path):
    root = tmp_path / "col"
    make_collected(root, 3)
    out = tmp_path / "ls" / "tasks.json"
    assert dt.export_labelstudio(root, out) == 3
    tasks = json.loads(out.read_text())
    pred = tasks[0]["predictions"][0]
    assert pred["model_version"] == "det-test"
    r0 = pred["result"][0]
    assert r0["value"]["rectanglelabels"] == ["nimh"] and r0["score"] == pytest.approx(0.4)
    assert r0["original_width"] == 320 and 0 <= r0["value"]["x"] <= 100
    assert "<RectangleLabels" in (out.parent / "labeling_config.xml").read_text()
    # what Label Studio exports after a person accepted the box but changed the class
    for t in tasks:
        res = [dict(r, value=dict(r["value"], rectanglelabels=["alkaline"])) for r in t["predictions"][0]["result"]]
        t["annotations"] = [{"result": res, "was_cancelled": False}]
    exported = tmp_path / "ls" / "export.json"
    exported.write_text(json.dumps(tasks))
    assert dt.import_labels(root, exported)["imported"] == 3
    for c in dt.captures(root):
        (cls, cx, cy, w, h), = dt.read_yolo(c["label"])
        (_, pcx, pcy, pw, ph), = dt.read_yolo(root / "prelabels" / f"{c['name']}.txt")
        assert cls == 4 and (cx, cy, w, h) == pytest.approx((pcx, pcy, pw, ph), abs=1e-5)


def test_import_refuses_classes_the_taxonomy_lacks(tmp_path):
    root = tmp_path / "col"
    make_collected(root, 1)
    z = tmp_path / "odd.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("obj.names", "toaster\n")
        zf.writestr("obj_train_data/x.txt", "0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(dt.DatasetError, match="toaster"):
        dt.import_labels(root, z)


def test_merge_uses_only_checked_labels_and_caps_synthetic(tmp_path):
    root = tmp_path / "col"
    make_collected(root, 6)
    synth = tmp_path / "synth"
    for part, n in (("train", 20), ("val", 2)):
        (synth / "images" / part).mkdir(parents=True)
        (synth / "labels" / part).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(synth / "images" / part / f"s{i}.jpg"), _scene(100 + i))
            (synth / "labels" / part / f"s{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (synth / "data.yaml").write_text(yaml.safe_dump({"path": str(synth), "train": "images/train", "val": "images/val"}))
    with pytest.raises(dt.DatasetError, match="nothing to train on"):
        dt.merge([root], tmp_path / "m0")
    labels = tmp_path / "fixed"
    labels.mkdir()
    for c in dt.captures(root)[:4]:
        (labels / f"{c['name']}.txt").write_text("4 0.5 0.5 0.1 0.1\n")
    assert dt.import_labels(root, labels)["imported"] == 4
    m = dt.merge([root, synth], tmp_path / "m", synth_fraction=0.5, seed=0)
    # the two unchecked frames stay out; synthetic images are capped at half the training set
    assert 1 <= m["collected_train"] <= 4 and m["synthetic_train"] == m["collected_train"]
    train = (tmp_path / "m" / "train.txt").read_text().split()
    assert all(Path(p).exists() and dt.label_of(Path(p)).exists() for p in train)
    assert len(m["fingerprint"]) == 16


def test_dedupe_moves_near_copies_aside(tmp_path):
    root = tmp_path / "col"
    make_collected(root, 8, dup_of={3: 2, 7: 6})
    r = dt.dedupe(root, dry_run=True)
    assert r["duplicates"] == 2 and r["frames"] == 8
    r = dt.dedupe(root)
    assert r["kept"] == 6 and len(dt.captures(root)) == 6
    assert len(list((root / "duplicates" / "images").glob("*.jpg"))) == 2
    assert {p["removed"].split("_t")[-1] for p in r["pairs"]} == {"3", "7"}
