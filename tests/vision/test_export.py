"""`kozan model export`: ONNX with Kozan's metadata, and nothing else touched on the way."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_export_writes_the_metadata_and_leaves_the_registry_file_beside_the_weights_alone(tmp_path: Path) -> None:
    pytest.importorskip("ultralytics", reason="export needs the 'train' extra (make test installs it)")
    from vision.detector import Detector
    from vision.training import export_onnx

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy2(REPO / "models" / "det-v1.pt", models / "det-v1.pt")
    sibling = models / "det-v1.onnx"                   # the registry's file for these weights
    sibling.write_bytes(b"the registry's own det-v1.onnx")
    out = export_onnx(models / "det-v1.pt", tmp_path / "out" / "det-v1-small.onnx", (128, 224), "det-v1-small", "f00d")
    # ultralytics writes its ONNX beside the weights it exports: that must never be the registry's file
    assert sibling.read_bytes() == b"the registry's own det-v1.onnx"
    assert sorted(p.name for p in models.iterdir()) == ["det-v1.onnx", "det-v1.pt"]
    det = Detector(out)
    assert det.info.version == "det-v1-small" and det.info.data_fingerprint == "f00d"
    assert tuple(det.info.input_hw) == (128, 224)
    assert (out.with_suffix(".pt")).exists()          # the weights travel with the export (fine-tuning)
