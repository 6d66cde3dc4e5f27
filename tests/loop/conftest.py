"""Helpers for the capture → dataset → registry → hot-swap tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vision.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[2]


def tiny_onnx(path: Path, names: list[str] | None = None, version: str = "tiny", hw: tuple[int, int] = (64, 64),
              dynamic: bool = False, boxes: list[tuple[float, float, float, float, int, float]] = ()) -> Path:
    """A few-hundred-byte 'detector' ONNX file: fixed outputs (the given boxes, in input pixels), real metadata.

    Enough to test loading, validation, the registry and hot-swaps without a real network.
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    names = list(names or load_taxonomy().names)
    nc, n = len(names), 8
    out = np.zeros((1, 4 + nc, n), np.float32)
    for j, (cx, cy, w, h, c, s) in enumerate(boxes):
        out[0, :4, j] = (cx, cy, w, h)
        out[0, 4 + c, j] = s
    in_shape = ["batch", 3, "h", "w"] if dynamic else [1, 3, hw[0], hw[1]]
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, in_shape)
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + nc, n])
    const = helper.make_tensor("boxes", TensorProto.FLOAT, out.shape, out.ravel().tolist())
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [helper.make_node("ReduceMean", ["images"], ["m"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["z", "boxes"], ["output0"])]
    g = helper.make_graph(nodes, "tiny", [x], [y], initializer=[const, zero])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    for k, v in {"names": str(dict(enumerate(names))), "kozan_version": version,
                 "kozan_data_fingerprint": f"fp-{version}"}.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return path
