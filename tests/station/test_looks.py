"""The inspectors' looks, inline (virtual time) and on a worker thread (real time)."""
from __future__ import annotations

import time

import cv2
import pytest

from station.config import StationConfig
from station.looks import InlineLooks, ThreadedLooks
from station.simline.board_crops import write_board_crops
from vision.inspection import BoardInspector
from vision.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def boards(tmp_path_factory) -> list[tuple[object, bool]]:
    out = tmp_path_factory.mktemp("crops")
    write_board_crops(out, 30, seed=9, val_fraction=0.0, jitter=0.0)
    res = []
    for img in sorted((out / "images" / "train").glob("*.jpg")):
        has = bool((out / "labels" / "train" / f"{img.stem}.txt").read_text().strip())
        res.append((cv2.imread(str(img)), has))
    assert any(h for _, h in res) and not all(h for _, h in res)
    return res


@pytest.fixture(scope="module")
def inspector() -> BoardInspector:
    cfg = StationConfig()
    return BoardInspector(cfg.resolve(cfg.inspector.model), {c.name for c in load_taxonomy().classes if c.is_battery},
                          threads=1)


def _box(im):
    return (6.0, 6.0, im.shape[1] - 6.0, im.shape[0] - 6.0)


def test_worker_thread_gives_the_same_answers_as_the_inline_looks(boards, inspector):
    inline, threaded = InlineLooks({"board": inspector}), ThreadedLooks({"board": inspector})
    try:
        got_inline, got_threaded = {}, {}
        for k, (im, _) in enumerate(boards):
            inline.submit("board", k, im, _box(im))
            got_inline.update({tid: a.found for kind, tid, a in inline.take()})
            threaded.submit("board", k, im, _box(im))
            assert threaded.busy("board")              # one look in flight: the loop submits no other
            deadline = time.monotonic() + 10
            while threaded.busy("board") and time.monotonic() < deadline:
                time.sleep(0.005)
            got_threaded.update({tid: a.found for kind, tid, a in threaded.take()})
        assert got_threaded == got_inline and len(got_inline) == len(boards)
        # and they are right about most boards (the model's own accuracy is tested in tests/vision)
        right = sum(got_inline[k] == has for k, (_, has) in enumerate(boards))
        assert right >= 0.8 * len(boards)
    finally:
        threaded.close()


def test_the_worker_owns_a_copy_of_its_crop(boards, inspector):
    """The camera may reuse its frame buffer: a frame overwritten after submit changes nothing."""
    im, has = next((im, h) for im, h in boards if h)
    frame = im.copy()
    looks = ThreadedLooks({"board": inspector})
    try:
        looks.submit("board", 1, frame, _box(frame))
        frame[:] = 0
        deadline = time.monotonic() + 10
        while looks.busy("board") and time.monotonic() < deadline:
            time.sleep(0.005)
        assert looks.take() == [("board", 1, inspector.inspect(im, _box(im)))]
    finally:
        looks.close()


def test_a_look_that_fails_comes_back_as_none_and_the_worker_goes_on(boards, inspector):
    """A grey frame (2-D) makes the inspector raise: the loop hears None (it raises the alarm and the
    detector's view decides), and the next look works."""
    looks = ThreadedLooks({"board": inspector})
    try:
        im, _ = boards[0]
        looks.submit("board", 1, cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), _box(im))
        deadline = time.monotonic() + 10
        while looks.busy("board") and time.monotonic() < deadline:
            time.sleep(0.005)
        looks.submit("board", 2, im, _box(im))
        while looks.busy("board") and time.monotonic() < deadline:
            time.sleep(0.005)
        got = {tid: a for kind, tid, a in looks.take()}
        assert got[1] is None and isinstance(got[2].found, bool)
    finally:
        looks.close()


def test_a_board_look_and_a_battery_look_run_side_by_side_and_come_back_by_kind(boards, inspector):
    """One look of each kind may be in flight at once; each answer names its kind and its item."""
    from vision.inspection import BatteryInspector

    cfg = StationConfig()
    battery = BatteryInspector(cfg.resolve(cfg.inspector.battery_model), threads=1)
    im, _ = boards[0]
    looks = ThreadedLooks({"board": inspector, "battery": battery})
    inline = InlineLooks({"board": inspector, "battery": battery})
    try:
        looks.submit("board", 1, im, _box(im))
        looks.submit("battery", 2, im, _box(im))
        deadline = time.monotonic() + 10
        while (looks.busy("board") or looks.busy("battery")) and time.monotonic() < deadline:
            time.sleep(0.005)
        inline.submit("board", 1, im, _box(im))
        inline.submit("battery", 2, im, _box(im))
        assert sorted(looks.take(), key=lambda x: x[1]) == inline.take()
    finally:
        looks.close()
