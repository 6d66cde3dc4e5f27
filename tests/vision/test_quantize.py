"""Static int8 quantisation of the shipped model, calibrated on a tiny rendered dataset: the result
is QDQ int8 with the head's decode in float, carries Kozan's metadata, and still finds the items."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx", reason="quantisation needs the train extra's onnx")

from vision.detector import Detector, model_card_meta  # noqa: E402
from vision.evaluation import box_iou, split_samples  # noqa: E402
from vision.quantize import QuantizeError, head_float_nodes, quantize_static_int8  # noqa: E402


@pytest.fixture(scope="module")
def calib_dataset(tmp_path_factory) -> Path:
    from vision.datasets import write_synth_dataset

    out = tmp_path_factory.mktemp("tiny-calib")
    write_synth_dataset(out, n=8, seed=21, val_fraction=0.0, test_n=3, workers=1)
    return out / "data.yaml"


@pytest.fixture(scope="module")
def float_model(shipped_model) -> Path:
    """What quantisation starts from: the shipped model, or its float source when the shipped one is int8."""
    from vision.registry import Registry

    meta = {p.key: p.value for p in onnx.load(str(shipped_model)).metadata_props}
    if "kozan_quantization" not in meta:
        return shipped_model
    return Registry(shipped_model.parent).entry(json.loads(meta["kozan_quantization"])["source_version"]).onnx


@pytest.fixture(scope="module")
def int8_model(calib_dataset, float_model, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("q") / "det-int8.onnx"
    info = quantize_static_int8(float_model, calib_dataset, out, n_images=8)
    return out, info


def test_metadata_carried_and_marked(int8_model, float_model):
    path, info = int8_model
    f, q = model_card_meta(float_model), model_card_meta(path)
    assert q["version"] == f["version"] + "-int8" == info["version"]
    assert q["names"] == f["names"] and q["input_hw"] == f["input_hw"]
    assert q["data_fingerprint"] == f["data_fingerprint"]
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    rec = json.loads(meta["kozan_quantization"])
    assert rec["format"] == "QDQ" and rec["calibration"]["images"] == 8 and rec["calibration"]["split"] == "train"


def test_float_weights_travel_with_the_int8_file(int8_model, float_model):
    """An int8 model has no training weights of its own; fine-tuning it starts from its float source's."""
    path, info = int8_model
    assert float_model.with_suffix(".pt").exists(), "the float model keeps its training weights beside it"
    assert info["weights"] == str(path.with_suffix(".pt"))
    assert path.with_suffix(".pt").read_bytes() == float_model.with_suffix(".pt").read_bytes()


def test_convs_quantised_head_decode_in_float(int8_model, float_model):
    m = onnx.load(str(int8_model[0]))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") > 50 and ops.count("DequantizeLinear") > 100
    # every Conv weight goes through a DequantizeLinear (int8 weights)
    producer = {o: n for n in m.graph.node for o in n.output}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert convs and all(producer.get(n.input[1]) is not None and producer[n.input[1]].op_type == "DequantizeLinear"
                         for n in convs)
    # the decode tail after the last Convs stays float: nothing quantised feeds the output directly
    out = m.graph.output[0].name
    assert producer[out].op_type not in ("DequantizeLinear", "QuantizeLinear")
    kept = set(head_float_nodes(onnx.load(str(float_model))))
    assert {"Sigmoid", "Concat", "Softmax"} <= {n.op_type for n in onnx.load(str(float_model)).graph.node
                                                if n.name in kept}


def test_int8_model_finds_what_the_float_model_finds(int8_model, calib_dataset, float_model):
    import cv2

    f, q = Detector(float_model, threads=2), Detector(int8_model[0], threads=2)
    assert q.info.input_hw == f.info.input_hw
    matched = total = 0
    for s in split_samples(calib_dataset, "test")[0]:
        img = cv2.imread(str(s.image))
        df, dq = f(img), q(img)
        total += len(df)
        if len(df) and len(dq):
            iou = box_iou(df.boxes, dq.boxes)
            same = df.class_ids[:, None] == dq.class_ids[None, :]
            matched += int(((iou >= 0.5) & same).any(1).sum())
    assert total >= 5
    # quantising the head's decode would zero every score: this would be 0 of total
    assert matched >= 0.7 * total, (matched, total)
    assert int8_model[1]["sanity"]["int8_max_score"] > 0.5


def test_refuses_the_held_out_split(calib_dataset, float_model, tmp_path):
    with pytest.raises(QuantizeError, match="held out"):
        quantize_static_int8(float_model, calib_dataset, tmp_path / "x.onnx", split="test")
    with pytest.raises(QuantizeError, match="method"):
        quantize_static_int8(float_model, calib_dataset, tmp_path / "x.onnx", method="magic")
    assert not (tmp_path / "x.onnx").exists()


def test_refuses_a_model_that_is_int8_already(calib_dataset, tmp_path):
    """The registry holds one (det-v6n-int8); quantising it again would calibrate for 15 minutes."""
    int8 = Path(__file__).resolve().parents[2] / "models" / "det-v6n-int8.onnx"
    with pytest.raises(QuantizeError, match="quantised already"):
        quantize_static_int8(int8, calib_dataset, tmp_path / "x.onnx", n_images=2)
    assert not (tmp_path / "x.onnx").exists()


def test_the_box_heads_dfl_stays_float_and_its_rewrite_changes_no_output(int8_model, float_model, calib_dataset):
    """Quantised, the DFL's bin probabilities step by 1/255 and box edges move (golden mAP50-95 0.570
    against 0.585 with it in float); the rewrite that lets onnxruntime run it fast in float must compute
    what the exported graph computes."""
    import cv2
    import numpy as np
    import onnxruntime as ort

    from vision.quantize import float_dfl

    m = onnx.load(str(int8_model[0]))
    assert json.loads({p.key: p.value for p in m.metadata_props}["kozan_quantization"])["float_dfl"] == 1
    producer = {o: n for n in m.graph.node for o in n.output}
    dfl = [n for n in m.graph.node if "/bins_" in n.name]
    assert {"Exp", "MatMul", "Div"} <= {n.op_type for n in dfl}
    fed_by = {producer[i].op_type for n in dfl for i in n.input if i in producer}
    assert not fed_by & {"QuantizeLinear", "DequantizeLinear"}, fed_by

    rewritten = onnx.load(str(float_model))
    assert float_dfl(rewritten) == 1
    image = cv2.imread(str(split_samples(calib_dataset, "train")[0][0].image))
    x = Detector(float_model, threads=2).prepare(image).copy()
    def run(model) -> np.ndarray:
        return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]

    a, b = run(str(float_model)), run(rewritten.SerializeToString())
    assert np.array_equal(a[:, 4:], b[:, 4:])                 # class scores: untouched
    assert np.abs(a[:, :4] - b[:, :4]).max() < 1e-3           # box coordinates (input pixels): float rounding only


def test_the_dfl_rewrite_leaves_other_graphs_alone():
    """A softmax into a 1x1 conv without the DFL's transpose is some other function: not rewritten."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from vision.quantize import float_dfl

    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1), "w")
    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["p"], axis=1),
                           helper.make_node("Conv", ["p", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    before = m.SerializeToString()
    assert float_dfl(m) == 0 and m.SerializeToString() == before


def test_the_int8_file_names_the_version_it_is_given(calib_dataset, float_model, tmp_path):
    quantize_static_int8(float_model, calib_dataset, tmp_path / "x.onnx", n_images=2, version="det-x-int8b")
    assert model_card_meta(tmp_path / "x.onnx")["version"] == "det-x-int8b"
