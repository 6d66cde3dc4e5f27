import numpy as np

from calibration.geometry import BeltGeometry
from vision.detections import Detections
from vision.tracking import BeltTracker

PPM, MPC, W = 2.0, 0.1, 1280
GEOM = BeltGeometry.from_scale(PPM, MPC)


def tracker() -> BeltTracker:
    return BeltTracker(GEOM, 8, board_ids=[0, 1], battery_ids=[2, 3, 4, 5, 6, 7], view_length_mm=W / PPM)


def dets(items, travel_mm, noise=0.0, rng=None):
    """items: (u_center_mm, y_mm, length_mm, width_mm, cls) → boxes in px at this belt travel, clipped."""
    boxes, cls = [], []
    for u, y, L, Wd, c in items:
        x = u + travel_mm
        b = np.array([x - L / 2, y - Wd / 2, x + L / 2, y + Wd / 2]) * PPM
        if rng is not None:
            b = b + rng.normal(0, noise, 4)
        b = np.clip(b, 0, [W, 720, W, 720])
        if b[2] - b[0] > 4:
            boxes.append(b)
            cls.append(c)
    if not boxes:
        return Detections.empty()
    return Detections(np.asarray(boxes, np.float32), np.full(len(boxes), 0.9, np.float32), np.asarray(cls, np.int32))


def test_one_track_per_item_across_the_view_with_noise_and_clipped_edges():
    rng = np.random.default_rng(0)
    items = [(-100.0, 100.0, 60.0, 20.0, 4), (-300.0, 250.0, 240.0, 180.0, 0), (-450.0, 60.0, 20.0, 20.0, 6)]
    tr = tracker()
    for k in range(0, 1300, 1):  # 16.7 mm per frame at 0.5 m/s, 30 fps
        travel = k * 16.7
        if travel > 1300:
            break
        tr.update(dets(items, travel, noise=1.5, rng=rng), int(travel / MPC), k / 30, W)
    ids = set(tr.tracks)  # those still in view plus the ones not yet pruned
    all_tracks = tr._next_id - 1
    assert all_tracks == 3, f"expected one track per item, made {all_tracks}"


def test_centre_is_exact_despite_entering_and_leaving_the_image():
    tr = tracker()
    item = [(-200.0, 100.0, 240.0, 40.0, 0)]
    seen = None
    for k in range(60):
        travel = k * 16.7
        out = tr.update(dets(item, travel), int(round(travel / MPC)), k / 30, W)
        if out:
            seen = out[0]
    assert seen is not None
    assert abs(seen.u_mm - (-200.0)) < 1.0
    assert abs(seen.length_mm - 240.0) < 2.0


def test_battery_on_a_board_is_part_of_the_board():
    tr = tracker()
    board = (-0.0, 200.0, 200.0, 150.0, 1)
    coin = (-20.0, 210.0, 20.0, 20.0, 6)
    for k in range(10):
        travel = 150 + k * 16.7
        tr.update(dets([board, coin], travel), int(round(travel / MPC)), k / 30, W)
    assert len(tr.tracks) == 1
    (t,) = tr.tracks.values()
    assert t.best_class == 1 and t.attached_votes == 10


def test_decided_track_is_kept_until_it_leaves_so_it_is_never_sorted_twice():
    tr = tracker()
    item = [(-50.0, 100.0, 50.0, 14.0, 4)]
    decided = 0
    for k in range(80):
        travel = k * 16.7
        # the detector misses the item for 12 frames after it was decided
        d = dets(item, travel) if not (30 <= k < 42) else Detections.empty()
        c = int(round(travel / MPC))
        tr.update(d, c, k / 30, W)
        for t in tr.due_for_decision(c, 400.0):
            t.decided = True
            decided += 1
        tr.prune(c)
    assert decided == 1
