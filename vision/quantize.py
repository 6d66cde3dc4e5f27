"""Static int8 quantisation (QDQ) of a Kozan detector with onnxruntime.quantization.

Calibration images go through `Detector.prepare` — the station's own letterbox, colour order and
scaling — so the activation ranges are those the model sees on the line. The detection head's
non-Conv nodes stay in float: its decode concatenates box coordinates (hundreds of pixels) with
class scores (0..1) into one tensor, and one int8 scale over both rounds every score to zero. So
does its DFL, the expectation over each box edge's 16 distance bins, rewritten first into a form
onnxruntime runs fast in float (`float_dfl`). Its other Convs are quantised like the rest. The
result carries the float model's metadata, with `kozan_version` suffixed `-int8` (or as given) and a
`kozan_quantization` record of how it was made.

Needs `onnx` (part of the `train` extra); the station only ever loads the result with onnxruntime.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from vision.detector import Detector
from vision.evaluation import split_samples

log = logging.getLogger(__name__)

_MODULE = re.compile(r"^/model\.(\d+)/")


class QuantizeError(RuntimeError):
    """Quantisation could not produce a usable model; the message says why and what to do."""


def float_dfl(model) -> int:
    """Rewrite the box head's DFL for float: returns how many were rewritten (0: no such pattern).

    The DFL turns each box edge's 16 distance-bin logits into their expected bin: a transpose, a
    softmax over the bins and a fixed 1x1 conv. It must stay in float. Quantised, the bin
    probabilities have steps of 1/255, and every box edge moves by up to a fifth of a bin (measured:
    golden mAP50-95 0.570 in int8 against 0.592 in float, 0.585 with the DFL alone in float). But in
    float, in its exported layout, onnxruntime runs the softmax over a strided axis (1.05 ms against
    0.16 ms in the int8 graph), and moving the bins last costs a 0.43 ms transpose. So the same
    arithmetic is written along the bins where they lie, [1, 4, 16, A], with no data moved:
    e = exp(x - max over bins); expected bin = (w @ e) / (1 @ e), both MatMuls over the bin axis.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        return 0      # before opset 13 Softmax(axis=1) flattens the trailing axes: another function
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def attr(node, name, default=None):
        return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)

    done = 0
    for conv in [n for n in graph.node if n.op_type == "Conv" and len(n.input) == 2 and n.input[1] in inits]:
        sm = producer.get(conv.input[0])
        tr = producer.get(sm.input[0]) if sm is not None and sm.op_type == "Softmax" else None
        w = numpy_helper.to_array(inits[conv.input[1]])
        if (tr is None or tr.op_type != "Transpose" or list(attr(tr, "perm", [])) != [0, 2, 1, 3]
                or attr(sm, "axis", -1) != 1 or w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1)
                or len(consumers[sm.output[0]]) != 1 or len(consumers[tr.output[0]]) != 1):
            continue
        x = tr.input[0]                                   # [1, H, C, A]: the bins on axis 2
        base = conv.name.rsplit("/", 1)[0]
        c = w.shape[1]

        def t(name: str) -> str:
            return f"{base}/bins_{name}"

        def node(op: str, inputs: list[str], out: str, name: str = "", **kw):
            return helper.make_node(op, inputs, [out], name=t(name or op), **kw)

        graph.initializer.extend([numpy_helper.from_array(w.reshape(1, c).astype(np.float32), t("weights")),
                                  numpy_helper.from_array(np.ones((1, c), np.float32), t("ones"))])
        if opset >= 18:       # ReduceMax takes its axes as an input from opset 18, as an attribute before
            graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), t("axis")))
            rmax = node("ReduceMax", [x, t("axis")], t("max"), keepdims=1)
        else:
            rmax = node("ReduceMax", [x], t("max"), axes=[2], keepdims=1)
        new = [rmax,
               node("Sub", [x, t("max")], t("shifted")),
               node("Exp", [t("shifted")], t("exp")),
               node("MatMul", [t("weights"), t("exp")], t("num"), name="MatMul_num"),
               node("MatMul", [t("ones"), t("exp")], t("den"), name="MatMul_den"),
               node("Div", [t("num"), t("den")], t("expect")),
               # [1, H, 1, A] -> the conv's [1, 1, H, A]: a size-1 axis moves, no data does
               helper.make_node("Transpose", [t("expect")], [conv.output[0]], perm=[0, 2, 1, 3], name=t("Transpose"))]
        at = list(graph.node).index(tr)
        for old in (tr, sm, conv):
            graph.node.remove(old)
        if len(consumers[conv.input[1]]) == 1:
            graph.initializer.remove(inits[conv.input[1]])
        for k, n in enumerate(new):
            graph.node.insert(at + k, n)
        done += 1
    if done:
        onnx.checker.check_model(model)
    return done


def head_float_nodes(model) -> list[str]:
    """Names of the detection head's non-Conv nodes (to keep in float).

    The head is the last `/model.N/` module of an ultralytics export; for graphs named otherwise,
    the nodes from the last Convs to the output (the decode tail) are found by walking back from
    the graph output through non-Conv nodes. Both sets are returned together.
    """
    nodes = list(model.graph.node)
    names: set[str] = set()
    idx = [int(m.group(1)) for n in nodes if (m := _MODULE.match(n.name))]
    if idx:
        head = f"/model.{max(idx)}/"
        names |= {n.name for n in nodes if n.name.startswith(head) and n.op_type != "Conv"}
    producer = {o: n for n in nodes for o in n.output}
    stack = [o.name for o in model.graph.output]
    seen: set[str] = set()
    while stack:
        n = producer.get(stack.pop())
        if n is None or n.name in seen or n.op_type == "Conv":
            continue
        seen.add(n.name)
        names.add(n.name)
        stack.extend(n.input)
    return sorted(names)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over dataset images, prepared by the Detector."""

    def __init__(self, det: Detector, images: list[Path], progress: Callable[[int, int], None] | None):
        self.det, self.images, self.progress = det, images, progress
        self.name = det.session.get_inputs()[0].name
        self.i = 0

    def get_next(self) -> dict | None:
        if self.i >= len(self.images):
            return None
        img = cv2.imread(str(self.images[self.i]), cv2.IMREAD_COLOR)
        if img is None:
            raise QuantizeError(f"{self.images[self.i]}: OpenCV cannot read this calibration image")
        self.i += 1
        if self.progress:
            self.progress(self.i, len(self.images))
        return {self.name: self.det.prepare(img).copy()}

    def rewind(self) -> None:
        self.i = 0


def quantize_static_int8(model: Path, calib_yaml: Path, out: Path, n_images: int = 200, split: str = "train",
                         method: str = "minmax", seed: int = 0, reduce_range: bool = True,
                         version: str | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a static QDQ int8 model of `model` to `out`; returns a summary (also in the metadata).

    `reduce_range` (7-bit weights) is on by default: on x86 CPUs without VNNI, onnxruntime's u8s8
    kernels can saturate with full-range weights.
    """
    try:
        import onnx
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise QuantizeError(f"quantisation needs the 'onnx' package ({e}); install the train extra: "
                            "pip install -e '.[train]'") from None
    if split == "test":
        raise QuantizeError("refusing to calibrate on the 'test' split: it is held out for evaluation; "
                            "use --split train or val")
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    if method not in methods:
        raise QuantizeError(f"calibration method {method!r}: choose one of {sorted(methods)}")
    model, out = Path(model), Path(out)
    det = Detector(model, threads=2)
    # quantising a QDQ model again does not fail: onnxruntime's calibration runs on, for a quarter
    # of an hour on 2 cores (measured: the suite's 900 s timeout), before anything is written
    done = [n.op_type for n in onnx.load(str(model)).graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if done:
        raise QuantizeError(f"{model} is quantised already ({len(done)} Quantize/DequantizeLinear nodes, version "
                            f"{det.info.version}): quantise its float source instead")
    out.parent.mkdir(parents=True, exist_ok=True)
    samples, names = split_samples(Path(calib_yaml), split)
    if names != list(det.names):
        raise QuantizeError(f"{calib_yaml}: classes {names} are not the model's {list(det.names)}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(samples), size=min(n_images, len(samples)), replace=False))
    images = [samples[i].image for i in pick]

    float_model = onnx.load(str(model))
    meta = {p.key: p.value for p in float_model.metadata_props}
    with tempfile.TemporaryDirectory(prefix="kozan-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        pre_model = onnx.load(str(pre))
        n_dfl = float_dfl(pre_model)
        if n_dfl:
            onnx.save(pre_model, str(pre))
        exclude = head_float_nodes(pre_model)
        extra = {"CalibMaxIntermediateOutputs": 16}   # bounded memory: ranges are merged every 16 images
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        quantize_static(str(pre), str(out), _Calibration(det, images, progress), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=reduce_range, calibrate_method=methods[method], nodes_to_exclude=exclude,
                        extra_options=extra)
    q = onnx.load(str(out))
    fingerprint = "unknown"
    try:
        from vision.datasets import data_yaml_fingerprint

        # the label files the data.yaml names (a folder-wide hash missed lists of folders: it hashed nothing)
        fingerprint = data_yaml_fingerprint(Path(calib_yaml))
    except Exception as e:  # the fingerprint is a record, not a requirement
        log.warning("no calibration data fingerprint: %s", e)
    info = {"source_model": str(model), "source_version": det.info.version, "format": "QDQ",
            "activations": "uint8 (asymmetric)",
            "weights": "int8 per-channel" + (" reduced range" if reduce_range else ""),
            "calibration": {"method": method, "data": str(calib_yaml), "split": split, "images": len(images),
                            "seed": seed, "data_fingerprint": fingerprint,
                            "preprocessing": "vision.detector.Detector.prepare (letterbox, RGB, 1/255)"},
            "float_nodes": len(exclude), "float_dfl": n_dfl}
    meta.update({"kozan_version": version or f"{det.info.version}-int8",
                 "kozan_quantization": json.dumps(info),
                 "description": (meta.get("description", "") + " — static int8 QDQ (onnxruntime)").strip(" —")})
    del q.metadata_props[:]
    for k, v in meta.items():
        p = q.metadata_props.add()
        p.key, p.value = k, str(v)
    onnx.save(q, str(out))
    info["out"] = str(out)
    # the float weights travel with the int8 file: `kozan model train --from <int8 version>` fine-tunes
    # them (int8 has no training weights of its own), as the registry's layout promises for every model
    if model.with_suffix(".pt").exists() and model.with_suffix(".pt").resolve() != out.with_suffix(".pt").resolve():
        shutil.copy2(model.with_suffix(".pt"), out.with_suffix(".pt"))
        info["weights"] = str(out.with_suffix(".pt"))
    info["version"] = meta["kozan_version"]
    info["sanity"] = _sanity(model, out, images[: min(8, len(images))])
    return info


def _sanity(float_path: Path, int8_path: Path, images: list[Path]) -> dict:
    """Both models on a few calibration images: the int8 one must still score what the float one finds."""
    f, q = Detector(float_path, threads=2), Detector(int8_path, threads=2)
    fmax, qmax = [], []
    for p in images:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        t = f.prepare(img).copy()
        fo = f.session.run(None, {f.session.get_inputs()[0].name: t})[0][0]
        qo = q.session.run(None, {q.session.get_inputs()[0].name: t})[0][0]
        fmax.append(float(fo[4:].max()))
        qmax.append(float(qo[4:].max()))
    res = {"images": len(images), "float_max_score": round(max(fmax), 4), "int8_max_score": round(max(qmax), 4)}
    if max(fmax) > 0.5 and max(qmax) < 0.05:
        raise QuantizeError(f"{int8_path}: the int8 model scores nothing where the float one finds items ({res}); "
                            "the detection head must stay in float — check head_float_nodes() for this graph")
    return res
