"""The board inspector's crop, its training crops from the simulated line, and the shipped model."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from station.simline.board_crops import write_board_crops
from vision.detections import containment
from vision.inspection import crop_box
from vision.taxonomy import load_taxonomy


def test_crop_box_keeps_a_margin_and_stays_in_the_frame():
    assert crop_box((100, 50, 300, 150), 1280, 720) == (88, 44, 312, 156)     # 6 % of 200 px, 6 px minimum
    x0, y0, x1, y1 = crop_box((2, 1, 1279, 719), 1280, 720)
    assert (x0, y0, x1, y1) == (0, 0, 1280, 720)


def test_containment_is_the_share_of_each_box_inside_another():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30]], np.float32)
    assert containment(a, (0, 0, 10, 10))[:, 0].tolist() == pytest.approx([1.0, 0.25, 0.0])


def test_board_crops_label_the_cells_on_the_board(tmp_path: Path):
    m = write_board_crops(tmp_path / "bc", 60, seed=3, val_fraction=0.0)
    assert m["n"] >= 60 and m["crops_with_a_battery"]["train"] > 0
    batteries = {c.id for c in load_taxonomy().classes if c.is_battery}
    labelled = 0
    for img in sorted((tmp_path / "bc" / "images" / "train").glob("*.jpg")):
        im = cv2.imread(str(img))
        assert im is not None and min(im.shape[:2]) > 40           # a whole board at 1.8 px/mm, with margin
        lines = (tmp_path / "bc" / "labels" / "train" / f"{img.stem}.txt").read_text().split()
        for k in range(0, len(lines), 5):
            c, cx, cy, w, h = int(lines[k]), *map(float, lines[k + 1:k + 5])
            assert c in batteries                                  # only batteries are labelled: the board is the context
            assert 0 < w < 1 and 0 < h < 1 and w / 2 <= cx <= 1 - w / 2 + 1e-6 and h / 2 <= cy <= 1 - h / 2 + 1e-6
            labelled += 1
    assert labelled == m["boxes"]["train"]
    # the same seed writes the same crops: a dataset is reproducible from its manifest
    again = write_board_crops(tmp_path / "bc2", 60, seed=3, val_fraction=0.0)
    assert again["fingerprint"] == m["fingerprint"]


def test_a_broken_inspector_model_stops_the_station_with_a_message_naming_the_setting(tmp_path: Path):
    from station.config import config_from_dict
    from station.simrun import run_fast
    from vision.detector import ModelError

    bad = tmp_path / "insp.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"inspector\.model .*insp\.onnx.*corrupt or not an ONNX model"):
        run_fast(config_from_dict({"inspector": {"model": str(bad)}}), 5, seed=1)


def test_the_shipped_inspector_sees_cells_on_boards_and_not_capacitors(tmp_path: Path):
    """Board crops from a line seed the inspector never trained on (training: 101, this: 7)."""
    from station.config import StationConfig
    from vision.inspection import BoardInspector

    tax = load_taxonomy()
    cfg = StationConfig()
    insp = BoardInspector(cfg.resolve(cfg.inspector.model), {c.name for c in tax.classes if c.is_battery},
                          conf=cfg.inspector.conf_threshold)
    hit = miss = false = clean = 0
    out = tmp_path / "crops"
    write_board_crops(out, 80, seed=7, val_fraction=0.0, jitter=0.0)
    for img in sorted((out / "images" / "train").glob("*.jpg")):
        im = cv2.imread(str(img))
        m = 6          # the crop's margin back off: the board box the station would pass
        found = insp.inspect(im, (m, m, im.shape[1] - m, im.shape[0] - m)).found
        if (out / "labels" / "train" / f"{img.stem}.txt").read_text().strip():
            hit, miss = hit + found, miss + (not found)
        else:
            false, clean = false + found, clean + (not found)
    print(f"cells found {hit}/{hit + miss}, false {false}/{false + clean}")
    assert hit + miss >= 20 and false + clean >= 20
    assert hit / (hit + miss) >= 0.8
    assert false / (false + clean) <= 0.05
