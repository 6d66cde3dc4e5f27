"""The ONNX detector: letterbox, onnxruntime, decode and NMS — all of it, and nothing else.

The model describes itself: class names and input size come from the ONNX metadata that
ultralytics' export writes (and Kozan's export adds to), so any model exported the project's
way drops in. The detector owns its input buffer and reuses it every frame; decoding and NMS
are vectorised so their cost stays a small fraction of `session.run`.
"""
from __future__ import annotations

import ast
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from vision.detections import Detections

log = logging.getLogger(__name__)

PAD_VALUE = 114  # what ultralytics letterboxes with; the model was trained on it


class ModelError(RuntimeError):
    """A model file the station cannot use; the message says why and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    names: tuple[str, ...]
    input_hw: tuple[int, int]
    version: str
    data_fingerprint: str


def read_model_info(session: ort.InferenceSession, path: Path) -> ModelInfo:
    meta = session.get_modelmeta().custom_metadata_map
    inp = session.get_inputs()[0]
    shape = inp.shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):
        raise ModelError(f"{path}: input {inp.name} has shape {shape}; Kozan needs a fixed NCHW input "
                         "(export with dynamic=False)")
    if "names" not in meta:
        raise ModelError(f"{path}: no 'names' in the model metadata; export it with `kozan model export` "
                         "(or ultralytics' ONNX export), which records the class names")
    try:
        raw = ast.literal_eval(meta["names"])
    except (ValueError, SyntaxError) as e:
        raise ModelError(f"{path}: metadata 'names' is unreadable ({e})") from None
    names = tuple(raw[k] for k in sorted(raw)) if isinstance(raw, dict) else tuple(raw)
    out = session.get_outputs()[0].shape
    if len(out) != 3 or (isinstance(out[1], int) and out[1] != 4 + len(names)):
        raise ModelError(f"{path}: output shape {out} does not fit a YOLO detection head with "
                         f"{len(names)} classes (expected (1, {4 + len(names)}, N))")
    return ModelInfo(path=path, names=names, input_hw=(int(shape[2]), int(shape[3])),
                     version=meta.get("kozan_version", path.stem),
                     data_fingerprint=meta.get("kozan_data_fingerprint", "unknown"))


SPIN_MODES = ("run", "always", "never")


def make_session(path: Path, threads: int, spin: str = "always") -> ort.InferenceSession:
    """`spin`: when onnxruntime's intra-op workers busy-wait for work rather than sleep. "always" is
    onnxruntime's default (they spin on after a run returns, on cores other threads need); "run"
    spins only inside a run; "never" sleeps between every parallel section."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model file not found; check detector.model in the configuration "
                         "or `kozan model list`")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if spin not in SPIN_MODES:
        raise ValueError(f"spin={spin!r}: expected one of {SPIN_MODES}")
    so.add_session_config_entry("session.intra_op.allow_spinning", "0" if spin == "never" else "1")
    so.add_session_config_entry("session.force_spinning_stop", "1" if spin == "run" else "0")
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for corrupt protobufs
        raise ModelError(f"{path}: onnxruntime cannot load this file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); it is corrupt or not an ONNX model — "
                         "re-export it or roll back to the previous version") from None


def nms_per_class(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, limit: int,
                  agnostic: bool = False) -> np.ndarray:
    """Greedy NMS, class-aware or across classes (`agnostic`): indices kept, best score first.

    OpenCV's NMS in C++: the same greedy rule as a numpy loop (stable order by score, IoU > `iou`
    suppresses; tests/vision/test_detector.py holds a plain reference that it must match), without a
    dozen numpy calls per kept box (~0.2 ms for a line frame's ~20 candidates, against ~0.01 ms).
    """
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    xywh = boxes.astype(np.float64)          # Rect2d: the IoU in double, class offsets without rounding
    xywh[:, 2:] -= xywh[:, :2]
    s = scores.astype(np.float32, copy=False)
    # the caller has thresholded the scores already; 0 is the lowest threshold OpenCV takes
    if agnostic:
        idx = cv2.dnn.NMSBoxes(xywh, s, 0.0, iou)
    else:
        idx = cv2.dnn.NMSBoxesBatched(xywh, s, classes.astype(np.int32, copy=False), 0.0, iou)
    return np.asarray(idx, np.int64).reshape(-1)[:limit]


class Detector:
    """One onnxruntime session and its reusable buffers. Not thread-safe: one loop owns it."""

    def __init__(self, model_path: str | Path, conf_threshold: float = 0.25, iou_threshold: float = 0.5,
                 threads: int = 2, max_detections: int = 100, agnostic_nms: bool = True,
                 spin: str = "always"):
        from vision.registry import resolve_model_path

        # `models/active.onnx` names the registry's active version wherever a path is given (config, CLI, bench)
        self.path = resolve_model_path(Path(model_path))
        self.spin = spin
        self.session = make_session(self.path, threads, spin)
        self.info = read_model_info(self.session, self.path)
        self.conf = conf_threshold
        self.iou = iou_threshold
        self.max_det = max_detections
        # On a belt one place holds one item. Class-aware NMS keeps an AA cell's "alkaline" box and its
        # overlapping "nimh" box both, and the tracker then makes two items of one (measured: 52
        # decisions for 40 items, seed 7). Across classes the strongest box wins and the suppressed
        # box's class gets no vote from that frame; the track's votes over many frames still weigh the
        # classes. Evaluation passes False (the COCO convention).
        self.agnostic = agnostic_nms
        self._input_name = self.session.get_inputs()[0].name
        h, w = self.info.input_hw
        self._canvas = np.full((h, w, 3), PAD_VALUE, np.uint8)
        self._tensor = np.empty((1, 3, h, w), np.float32)
        self._planes = [np.empty((h, w), np.uint8) for _ in range(3)]
        self._geom: tuple[int, int, float, int, int, int, int] | None = None
        self._halves: list[np.ndarray] = []
        self._out, self._io = self._bind_buffers()

    def _bind_buffers(self) -> tuple[np.ndarray | None, ort.IOBinding | None]:
        """The session reads the input tensor and writes its output where they already lie.

        Why: `session.run` allocates the ~100 KB output anew on every frame; bound to one array, a call
        took ~0.08 ms less (in situ, interleaved). A model whose output shape is not fixed keeps
        `session.run`. Nothing the decode returns points into the output array, which the next frame
        overwrites.
        """
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        if inp.type != "tensor(float)" or out.type != "tensor(float)" or \
                not all(isinstance(d, int) for d in out.shape):
            return None, None
        buf = np.empty(out.shape, np.float32)
        io = self.session.io_binding()
        io.bind_input(inp.name, "cpu", 0, np.float32, list(self._tensor.shape), self._tensor.ctypes.data)
        io.bind_output(out.name, "cpu", 0, np.float32, list(out.shape), buf.ctypes.data)
        return buf, io

    @property
    def names(self) -> tuple[str, ...]:
        return self.info.names

    def _letterbox(self, image: np.ndarray) -> tuple[float, int, int]:
        H, W = image.shape[:2]
        h, w = self.info.input_hw
        if self._geom is None or self._geom[:2] != (H, W):
            r = min(h / H, w / W)
            nh, nw = int(round(H * r)), int(round(W * r))
            dy, dx = (h - nh) // 2, (w - nw) // 2
            self._canvas[:] = PAD_VALUE
            self._halves = self._halving_buffers(H, W, nw)
            self._geom = (H, W, r, nh, nw, dy, dx)
        _, _, r, nh, nw, dy, dx = self._geom
        roi = self._canvas[dy:dy + nh, dx:dx + nw]
        src = image
        for buf in self._halves:
            # at exactly 2x, bilinear samples the middle of each 2x2 block: OpenCV's fixed-point
            # arithmetic gives the area filter's (a+b+c+d+2)>>2 to the bit, ~0.1 ms sooner
            cv2.resize(src, (buf.shape[1], buf.shape[0]), dst=buf, interpolation=cv2.INTER_LINEAR)
            src = buf
        # what is left is at most a halving (or an enlargement), where bilinear is what ultralytics
        # trains with; a larger odd-sized reduction keeps the slow, alias-free area filter
        interp = cv2.INTER_LINEAR if nw >= src.shape[1] / 2 else cv2.INTER_AREA
        cv2.resize(src, (nw, nh), dst=roi, interpolation=interp)
        # HWC->CHW by OpenCV's split, then BGR->RGB and 1/255 plane by plane into the preallocated tensor:
        # contiguous planes take half the time of one pass over numpy's strided transpose (0.08 / 0.16 ms)
        planes = cv2.split(self._canvas, self._planes)
        for c in range(3):
            np.multiply(planes[2 - c], np.float32(1 / 255.0), out=self._tensor[0, c], casting="unsafe")
        return r, dx, dy

    @staticmethod
    def _halving_buffers(H: int, W: int, nw: int) -> list[np.ndarray]:
        """Buffers for exact 2x reductions while more than a halving remains.

        Why: OpenCV's area filter at a fractional ratio (1280 -> 416 px) costs ~4-9 ms on one
        core, more than the rest of the station's per-frame work; at exactly 2x it is a 2x2 box
        mean (~0.4 ms). Halving first and finishing bilinearly gives the same anti-aliased image
        the training images had (rendered, stored at 640 px by area, resized bilinearly).
        """
        bufs = []
        while nw < W / 2 and W % 2 == 0 and H % 2 == 0:
            H, W = H // 2, W // 2
            bufs.append(np.empty((H, W, 3), np.uint8))
        return bufs

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """The model input for `image` (for benchmarks: the raw session on a prepared tensor)."""
        self._letterbox(image)
        return self._tensor

    def __call__(self, image: np.ndarray) -> Detections:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 BGR image, got shape {image.shape}")
        r, dx, dy = self._letterbox(image)
        if self._io is not None:
            self.session.run_with_iobinding(self._io)
            out = self._out[0]                                                       # (4+nc, N)
        else:
            out = self.session.run(None, {self._input_name: self._tensor})[0][0]
        return self.decode(out, r, dx, dy, image.shape[1], image.shape[0])

    def decode(self, out: np.ndarray, r: float, dx: int, dy: int, W: int, H: int) -> Detections:
        cls_scores = out[4:]
        # the best score per anchor by a row-wise max, and the class only for the few anchors kept:
        # an argmax down the columns of all ~2200 anchors cost 5x as long (0.077 / 0.016 ms)
        scores = cls_scores.max(0)
        keep = scores > self.conf
        if not keep.any():
            return Detections.empty()
        b = out[:4, keep]                                   # cx, cy, w, h: one row each
        scores, class_ids = scores[keep], cls_scores[:, keep].argmax(0)
        half = b[2:] * 0.5
        boxes = np.concatenate((b[:2] - half, b[:2] + half)).T   # x0 y0 x1 y1 in the model input
        boxes -= np.array((dx, dy, dx, dy), np.float32)         # back to the camera frame
        boxes /= np.float32(r)
        np.clip(boxes, 0, np.array((W, H, W, H), np.float32), out=boxes)
        idx = nms_per_class(boxes, scores, class_ids, self.iou, self.max_det, self.agnostic)
        return Detections(boxes[idx].astype(np.float32), scores[idx].astype(np.float32),
                          class_ids[idx].astype(np.int32))


def model_card_meta(path: Path) -> dict:
    """Metadata of a model file without keeping a session (for listings and checks)."""
    sess = make_session(path, 1)
    info = read_model_info(sess, path)
    meta = sess.get_modelmeta().custom_metadata_map
    return {"names": list(info.names), "input_hw": list(info.input_hw), "version": info.version,
            "embedded_version": meta.get("kozan_version"),
            "data_fingerprint": info.data_fingerprint, "input": json.loads(meta.get("kozan_input", "{}"))}
