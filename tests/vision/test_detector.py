import numpy as np
import pytest

from station.clock import VirtualClock
from station.config import StationConfig
from station.simline.camera import SimCamera
from station.simline.world import BeltWorld
from vision.detector import Detector, ModelError, make_session, nms_per_class
from vision.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def detector(shipped_model):
    return Detector(shipped_model, threads=2)


def test_model_describes_itself(detector):
    assert list(detector.names) == load_taxonomy().names
    assert detector.info.input_hw[0] % 32 == 0 and detector.info.input_hw[1] % 32 == 0
    assert detector.info.version and detector.info.version != "unknown"


def _iou(a, b):
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_finds_the_items_on_the_simulated_line(detector):
    """Frames of the simulated line, in source pixels: boxes and classes match the ground truth."""
    cfg = StationConfig()
    clock = VirtualClock()
    world = BeltWorld(cfg, clock, n_items=60, seed=99)
    cam = SimCamera(cfg, world, clock, seed=99)
    names = list(detector.names)
    found = total = right_class = 0
    for k in range(0, 900, 9):
        t = k / 30
        clock.advance_to(t)
        f = cam.render_at(t)
        world.settle()
        det = detector(f.image)
        for cls, box in cam.last_truth:
            if box[0] < 5 or box[2] > cfg.camera.width - 5:
                continue   # cut by the image edge: the tracker does not rely on those
            total += 1
            ious = [_iou(box, b) for b in det.boxes]
            if ious and max(ious) >= 0.5:
                found += 1
                right_class += names[int(det.class_ids[int(np.argmax(ious))])] == cls
    print(f"found {found}/{total}, right class {right_class}/{found}")
    assert total > 80
    assert found / total >= 0.9, (found, total)
    # measured 2026-11-25: det-v9 and its int8 copy each found 176/180, 164 of them the right class;
    # det-v4 found 176/180, 159 the right class (earlier notes: det-v3 158/176, det-v1 0.84): the cells'
    # classes are the weak part
    assert right_class / max(found, 1) >= 0.87, (right_class, found)


def test_preallocated_output_gives_session_runs_detections_and_keeps_earlier_frames_intact(shipped_model):
    """The session writes every frame's output into one array: the detections must be those of a plain
    `session.run`, and a frame's detections must not change when the next frame is detected."""
    bound = Detector(shipped_model, threads=1)
    assert bound._io is not None                 # the shipped model's output shape is fixed
    plain = Detector(shipped_model, threads=1)
    plain._io = None                             # session.run, as for a model with a symbolic output shape
    cfg = StationConfig()
    clock = VirtualClock()
    world = BeltWorld(cfg, clock, n_items=20, seed=5)
    cam = SimCamera(cfg, world, clock, seed=5)
    kept, frames = [], 0
    for k in range(0, 300, 10):
        clock.advance_to(k / 30)
        img = cam.render_at(k / 30).image
        world.settle()
        d, ref = bound(img), plain(img)
        assert np.array_equal(d.boxes, ref.boxes) and np.array_equal(d.scores, ref.scores)
        assert np.array_equal(d.class_ids, ref.class_ids)
        kept.append((d, d.boxes.copy(), d.scores.copy()))
        frames += len(d) > 0
    assert frames >= 10
    for d, boxes, scores in kept:                # every later frame overwrote the output array
        assert np.array_equal(d.boxes, boxes) and np.array_equal(d.scores, scores)


def test_nothing_on_an_empty_belt(detector):
    cfg = StationConfig()
    clock = VirtualClock()
    world = BeltWorld(cfg, clock, n_items=0)
    cam = SimCamera(cfg, world, clock)
    assert len(detector(cam.render_at(0.0).image)) == 0


def test_corrupt_and_missing_models_are_refused_clearly(tmp_path, shipped_model):
    with pytest.raises(ModelError, match="not found"):
        Detector(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match="corrupt or not an ONNX model"):
        Detector(junk)
    half = tmp_path / "half.onnx"
    data = shipped_model.read_bytes()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError):
        Detector(half)


@pytest.mark.parametrize("spin,allow,stop", [("always", "1", "0"), ("run", "1", "1"), ("never", "0", "0")])
def test_spin_setting_reaches_onnxruntime(shipped_model, spin, allow, stop):
    so = make_session(shipped_model, 2, spin).get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == allow
    assert so.get_session_config_entry("session.force_spinning_stop") == stop


def test_unknown_spin_is_refused_by_name(shipped_model):
    with pytest.raises(ValueError, match="spin='sometimes'.*never"):
        make_session(shipped_model, 2, "sometimes")


def test_decode_keeps_each_anchors_best_class_above_the_threshold(detector):
    """Hand-made head output: per anchor the best class decides, ties go to the lower class id (as
    an argmax), and an anchor whose best class is under the threshold is dropped whatever the rest."""
    nc = len(detector.names)
    out = np.zeros((4 + nc, 5), np.float32)
    out[:4] = np.array([[100, 300, 500, 700, 900], [50, 50, 50, 50, 50], [40, 40, 40, 40, 40],
                        [20, 20, 20, 20, 20]], np.float32)   # cx, cy, w, h: five boxes apart
    out[4 + 2, 0] = 0.9                      # class 2 only
    out[4 + 1, 1], out[4 + 5, 1] = 0.4, 0.7  # class 5 beats class 1
    out[4 + 3, 2] = out[4 + 6, 2] = 0.6      # a tie: the lower id
    out[4:, 3] = 0.2                         # every class under 0.25: dropped
    out[4 + 7, 4] = 0.26                     # just over
    d = detector.decode(out, 1.0, 0, 0, 1280, 720)
    x0s, scores = d.boxes[:, 0].round().astype(int).tolist(), d.scores.astype(float).round(2).tolist()
    got = sorted(zip(x0s, d.class_ids.tolist(), scores))
    assert got == [(80, 2, 0.9), (280, 5, 0.7), (480, 3, 0.6), (880, 7, 0.26)]


def test_decode_maps_boxes_back_to_the_camera_frame_and_clips_them(detector):
    """Model-input boxes (cx, cy, w, h) undo the letterbox's pad and scale, and stop at the frame's edges."""
    nc = len(detector.names)
    out = np.zeros((4 + nc, 2), np.float32)
    out[:4, 0] = (60, 40, 20, 10)        # inside: x 50..70, y 35..45 in the input
    out[:4, 1] = (200, 5, 40, 30)        # over the right and top edges of a 400x200 frame
    out[4, :] = 0.9
    d = detector.decode(out, 0.5, 10, 5, 400, 200)    # input = frame * 0.5, shifted by (10, 5)
    got = sorted(d.boxes.round(3).tolist())
    assert got == [[80.0, 60.0, 120.0, 80.0], [340.0, 0.0, 400.0, 30.0]]   # (340..420, -30..30) clipped


def test_wrong_image_shape_is_an_error(detector):
    with pytest.raises(ValueError, match="HxWx3"):
        detector(np.zeros((720, 1280), np.uint8))


def test_nms_keeps_best_per_class_and_separates_classes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    classes = np.array([0, 0, 1, 0])
    keep = nms_per_class(boxes, scores, classes, iou=0.5, limit=10)
    assert sorted(keep.tolist()) == [0, 2, 3]
    # the station's default: one place, one box, whatever classes the overlapping boxes carry
    keep = nms_per_class(boxes, scores, classes, iou=0.5, limit=10, agnostic=True)
    assert sorted(keep.tolist()) == [0, 3]


def _greedy_nms(boxes, scores, classes, iou, agnostic):
    """The rule written out plainly: best score first (ties: the earlier box), drop every box whose IoU
    with a kept one exceeds `iou`; class-aware NMS only compares boxes of one class."""
    kept: list[int] = []
    for i in sorted(range(len(boxes)), key=lambda k: -scores[k]):
        def overlap(j):
            if not agnostic and classes[i] != classes[j]:
                return 0.0
            ix = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            iy = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            inter = ix * iy
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            return inter / (area(boxes[i]) + area(boxes[j]) - inter)
        if all(overlap(j) <= iou for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("agnostic", [True, False])
def test_nms_is_the_greedy_rule_on_clusters_and_ties(agnostic):
    """OpenCV's NMS, which the detector calls, against the rule written out: clustered boxes as a
    detector gives them, scores rounded so that ties occur, the kept order best first."""
    rng = np.random.default_rng(1)
    for trial in range(300):
        n = int(rng.integers(1, 40))
        c = rng.uniform(0, 1200, (n, 2))
        wh = rng.uniform(5, 200, (n, 2))
        dup = rng.integers(0, n, n // 2)                         # half the boxes jittered copies of others
        c[: n // 2] = c[dup] + rng.normal(0, 6, (n // 2, 2))
        wh[: n // 2] = wh[dup] * rng.uniform(0.8, 1.2, (n // 2, 1))
        boxes = np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)
        scores = rng.uniform(0.25, 1, n).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores, 1).astype(np.float32)
        classes = rng.integers(0, 8, n)
        want = _greedy_nms(boxes.tolist(), scores.tolist(), classes.tolist(), 0.5, agnostic)
        assert nms_per_class(boxes, scores, classes, 0.5, 100, agnostic).tolist() == want
        assert nms_per_class(boxes, scores, classes, 0.5, 2, agnostic).tolist() == want[:2]


def test_one_box_per_item_on_the_line(detector, shipped_model):
    """The station's detector never gives two overlapping boxes (one item read as two classes)."""
    from station.clock import VirtualClock
    from station.config import StationConfig
    from station.simline.camera import SimCamera
    from station.simline.world import BeltWorld

    cfg = StationConfig()
    clock = VirtualClock(0.0)
    world = BeltWorld(cfg, clock, n_items=30, seed=7)
    cam = SimCamera(cfg, world, clock, seed=7)
    aware = Detector(shipped_model, agnostic_nms=False)
    pairs_aware = pairs_station = 0
    for k in range(0, 400, 4):
        clock.advance_to(k / cfg.camera.fps)
        img = cam.render_at(k / cfg.camera.fps).image
        for d, n in ((detector, "station"), (aware, "aware")):
            b = d(img).boxes
            if len(b) < 2:
                continue
            x0 = np.maximum(b[:, None, 0], b[None, :, 0]); y0 = np.maximum(b[:, None, 1], b[None, :, 1])
            x1 = np.minimum(b[:, None, 2], b[None, :, 2]); y1 = np.minimum(b[:, None, 3], b[None, :, 3])
            inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            iou = inter / (area[:, None] + area[None, :] - inter)
            over = int(np.triu(iou > 0.5, 1).sum())
            if n == "station":
                pairs_station += over
            else:
                pairs_aware += over
    print(f"overlapping box pairs in 100 frames: class-aware NMS {pairs_aware}, station (across classes) {pairs_station}")
    assert pairs_station == 0 and pairs_aware > 0


def test_a_camera_frame_is_reduced_as_the_training_images_were(detector):
    """1280x720 -> 416 px: an exact 2x box mean, then bilinear. The model input must match the
    alias-free area filter (what the training images were stored with) to within a grey level."""
    import cv2

    cfg = StationConfig()
    clock = VirtualClock()
    world = BeltWorld(cfg, clock, n_items=20, seed=4)
    cam = SimCamera(cfg, world, clock, seed=4)
    clock.advance_to(6.0)
    img = cam.render_at(6.0).image
    x = detector.prepare(img)[0].copy()
    assert [b.shape for b in detector._halves] == [(360, 640, 3)]
    ref_x = _reference_input(detector, lambda nw, nh: cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA))
    diff = np.abs(x - ref_x).mean() * 255
    print(f"mean difference {diff:.2f} grey levels")
    assert diff < 1.5
    # a crop no larger than twice the input is not halved first
    detector.prepare(np.ascontiguousarray(img[:400, :600]))
    assert detector._halves == []


def test_the_fast_reduction_is_the_area_filter_to_the_bit(detector):
    """The halving runs OpenCV's bilinear filter and the channel shuffle runs by planes because both are
    quicker; neither may change one value of the model input. Noise is the hard case for rounding."""
    import cv2

    img = np.random.default_rng(3).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    x = detector.prepare(img)[0].copy()
    half = cv2.resize(img, (640, 360), interpolation=cv2.INTER_AREA)
    assert np.array_equal(detector._halves[0], half)
    assert np.array_equal(x, _reference_input(
        detector, lambda nw, nh: cv2.resize(half, (nw, nh), interpolation=cv2.INTER_LINEAR)))


def _reference_input(detector, reduce) -> np.ndarray:
    """The model input for a 1280x720 frame, built the plain way: `reduce(nw, nh)` gives the reduced
    image, padded grey (114) to the input size, BGR->RGB, CHW, 1/255."""
    h, w = detector.info.input_hw
    r = min(h / 720, w / 1280)
    nh, nw = round(720 * r), round(1280 * r)
    ref = np.full((h, w, 3), 114, np.uint8)
    dy, dx = (h - nh) // 2, (w - nw) // 2
    ref[dy:dy + nh, dx:dx + nw] = reduce(nw, nh)
    return np.multiply(ref[:, :, ::-1].transpose(2, 0, 1), np.float32(1 / 255.0), dtype=np.float32)
