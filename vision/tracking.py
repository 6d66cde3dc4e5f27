"""Tracking along the belt: one track per physical item.

Items ride the belt, so each one has a belt-fixed coordinate `u` (mm) that stays put while the
belt moves. Association is then a prediction with almost no uncertainty: a detection belongs to
the track whose `u`, `y` it matches within a gate. The encoder count stamped on each frame does
the work that a motion model does in a general tracker.

A battery box lying mostly inside a board box is the battery *on* that board — one item, not two.
It is recorded on the board's track (`attached_votes`) and never becomes a track of its own, so
the sorter can send that board to the manual path instead of firing a battery diverter at it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calibration.geometry import BeltGeometry
from vision.detections import Detections, containment


@dataclass
class Track:
    id: int
    y_mm: float
    width_mm: float
    first_count: int
    last_count: int
    first_t: float
    # Belt-fixed along-belt coordinates of the item's downstream (front) and upstream (back)
    # edges, each averaged only over views where that edge was inside the image: a box cut by
    # the image border has a true inner edge and a false outer one.
    u_front: float | None = None
    u_back: float | None = None
    n_front: int = 0
    n_back: int = 0
    length_guess_mm: float = 0.0
    hits: int = 0
    missed: int = 0
    votes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))   # score sum per class
    attached_votes: int = 0      # frames in which a battery was seen on it
    attached_class_votes: dict[int, float] = field(default_factory=dict)
    decided: bool = False
    # the last detection box (frame pixels) and whether it lay wholly inside the image: what the
    # board inspector crops
    last_box: np.ndarray | None = None
    last_box_whole: bool = False
    looks: int = 0               # board inspector: crops inspected, and those with a battery on the board
    look_hits: int = 0
    look_pending: int = 0        # looks asked for whose answer has not come back
    last_look_count: int | None = None
    battery_looks: int = 0       # battery inspector: crops read, and the score read for each class
    battery_look_votes: np.ndarray | None = None
    battery_look_pending: int = 0
    last_battery_look_count: int | None = None
    born_x_mm: float = 0.0       # where it was first seen: past the decision line means too late to sort
    history: list[tuple[int, float, float, int, float]] = field(default_factory=list)  # count, u, y, cls, score

    @property
    def length_mm(self) -> float:
        if self.u_front is not None and self.u_back is not None:
            return max(self.u_front - self.u_back, 1.0)
        return self.length_guess_mm

    @property
    def u_mm(self) -> float:
        """Belt-fixed coordinate of the centre."""
        if self.u_front is not None and self.u_back is not None:
            return (self.u_front + self.u_back) / 2
        if self.u_front is not None:
            return self.u_front - self.length_guess_mm / 2
        assert self.u_back is not None
        return self.u_back + self.length_guess_mm / 2

    def x_at(self, count: int, geom: BeltGeometry) -> float:
        """Where the centre is (mm from the view's upstream edge) when the encoder reads `count`."""
        return self.u_mm + geom.travel_mm(count)

    @property
    def best_class(self) -> int:
        return int(np.argmax(self.votes))

    @property
    def confidence(self) -> float:
        """Mean score of the winning class over every frame the item was seen in (0 where another won)."""
        return float(self.votes.max() / max(self.hits, 1))


class BeltTracker:
    def __init__(self, geometry: BeltGeometry, n_classes: int, board_ids: list[int], battery_ids: list[int],
                 gate_mm: float = 30.0, max_missed: int = 8, attached_overlap: float = 0.6,
                 view_length_mm: float = 711.0, border_px: float = 2.0):
        self.geom = geometry
        self.n_classes = n_classes
        self.board_ids = np.asarray(board_ids, np.int32)
        self.battery_ids = np.asarray(battery_ids, np.int32)
        self.gate_mm = gate_mm
        self.max_missed = max_missed
        self.attached_overlap = attached_overlap
        self.view_length_mm = view_length_mm
        self.border_px = border_px
        self.tracks: dict[int, Track] = {}
        self._next_id = 1

    def _split_attached(self, det: Detections) -> tuple[np.ndarray, dict[int, list[tuple[int, float]]]]:
        """Indices of whole items, and for each board index the battery detections lying on it."""
        n = len(det)
        is_board = np.isin(det.class_ids, self.board_ids)
        is_batt = np.isin(det.class_ids, self.battery_ids)
        whole = np.ones(n, bool)
        on_board: dict[int, list[tuple[int, float]]] = {}
        if is_board.any() and is_batt.any():
            bi = np.nonzero(is_batt)[0]
            gi = np.nonzero(is_board)[0]
            c = containment(det.boxes[bi], det.boxes[gi])
            best = c.argmax(1)
            for k, b in enumerate(bi):
                if c[k, best[k]] >= self.attached_overlap:
                    whole[b] = False
                    on_board.setdefault(int(gi[best[k]]), []).append((int(det.class_ids[b]), float(det.scores[b])))
        return np.nonzero(whole)[0], on_board

    def update(self, det: Detections, count: int, t: float, image_width: int) -> list[Track]:
        """Associate this frame's detections; returns the tracks seen in this frame."""
        idx, on_board = self._split_attached(det)
        travel = self.geom.travel_mm(count)
        n = len(idx)
        if n:
            b = det.boxes[idx]
            cy = (b[:, 1] + b[:, 3]) / 2
            back = self.geom.px_to_mm(np.stack([b[:, 0], cy], 1))
            front = self.geom.px_to_mm(np.stack([b[:, 2], cy], 1))
            top = self.geom.px_to_mm(np.stack([(b[:, 0] + b[:, 2]) / 2, b[:, 1]], 1))
            bottom = self.geom.px_to_mm(np.stack([(b[:, 0] + b[:, 2]) / 2, b[:, 3]], 1))
            ub, uf = back[:, 0] - travel, front[:, 0] - travel
            y = (top[:, 1] + bottom[:, 1]) / 2
            width = np.abs(bottom[:, 1] - top[:, 1])
            back_ok = b[:, 0] > self.border_px
            front_ok = b[:, 2] < image_width - self.border_px
        live = list(self.tracks.values())
        matched_det: set[int] = set()
        matched_trk: set[int] = set()
        if live and n:
            big = 1e9
            d = np.full((n, len(live)), big)
            for j, tr in enumerate(live):
                dy = np.abs(y - tr.y_mm)
                cand = np.full(n, big)
                if tr.u_front is not None:
                    cand = np.where(front_ok, np.minimum(cand, np.abs(uf - tr.u_front)), cand)
                if tr.u_back is not None:
                    cand = np.where(back_ok, np.minimum(cand, np.abs(ub - tr.u_back)), cand)
                # neither edge comparable (cut on both sides): fall back to the centres
                both_cut = ~front_ok & ~back_ok
                cand = np.where(both_cut, np.abs((uf + ub) / 2 - tr.u_mm), cand)
                d[:, j] = np.hypot(cand, dy)
            # a detection may wobble more on a large item: widen the gate with size
            tsize = np.array([min(t_.length_mm, t_.width_mm) for t_ in live])
            gate = self.gate_mm + 0.15 * tsize[None, :]
            pairs = np.argwhere(d <= gate)
            order = np.argsort(d[pairs[:, 0], pairs[:, 1]])
            for k in order:
                i, j = pairs[k]
                if i in matched_det or j in matched_trk:
                    continue
                matched_det.add(int(i))
                matched_trk.add(int(j))
                self._observe(live[j], det, int(idx[i]), uf[i], ub[i], bool(front_ok[i]), bool(back_ok[i]),
                              y[i], width[i], count, on_board)
        seen = [live[j] for j in matched_trk]
        seen_ids = {s_.id for s_ in seen}
        for t_ in live:
            if t_.id not in seen_ids:
                t_.missed += 1
        for i in range(n):
            if i in matched_det:
                continue
            tr = Track(id=self._next_id, y_mm=float(y[i]), width_mm=float(width[i]), first_count=count,
                       last_count=count, first_t=t, votes=np.zeros(self.n_classes, np.float64),
                       born_x_mm=float((front[i, 0] + back[i, 0]) / 2) if front_ok[i] and back_ok[i]
                       else (float(back[i, 0]) if not back_ok[i] else float(front[i, 0])))
            self._next_id += 1
            self.tracks[tr.id] = tr
            self._observe(tr, det, int(idx[i]), uf[i], ub[i], bool(front_ok[i]), bool(back_ok[i]),
                          y[i], width[i], count, on_board)
            seen.append(tr)
        return seen

    def _observe(self, tr: Track, det: Detections, k: int, uf: float, ub: float, front_ok: bool, back_ok: bool,
                 y: float, width: float, count: int, on_board: dict[int, list[tuple[int, float]]]) -> None:
        cls, score = int(det.class_ids[k]), float(det.scores[k])
        n = tr.hits
        # running means: belt-fixed coordinates are constant, averaging only removes detector noise
        if front_ok:
            tr.u_front = float(uf) if tr.u_front is None else (tr.u_front * tr.n_front + float(uf)) / (tr.n_front + 1)
            tr.n_front += 1
        if back_ok:
            tr.u_back = float(ub) if tr.u_back is None else (tr.u_back * tr.n_back + float(ub)) / (tr.n_back + 1)
            tr.n_back += 1
        if not front_ok and not back_ok and tr.u_front is None and tr.u_back is None:
            tr.u_back = float(ub)          # cut on both sides (longer than the view): best we have
        tr.length_guess_mm = max(tr.length_guess_mm, float(uf - ub))
        tr.y_mm = (tr.y_mm * n + float(y)) / (n + 1)
        tr.width_mm = (tr.width_mm * n + float(width)) / (n + 1)
        tr.votes[cls] += score
        tr.hits += 1
        tr.missed = 0
        tr.last_count = count
        tr.last_box = det.boxes[k]
        tr.last_box_whole = front_ok and back_ok
        if k in on_board:
            tr.attached_votes += 1
            for c, s_ in on_board[k]:
                tr.attached_class_votes[c] = tr.attached_class_votes.get(c, 0.0) + s_
        tr.history.append((count, float((uf + ub) / 2), float(y), cls, score))

    def due_for_decision(self, count: int, decision_line_mm: float) -> list[Track]:
        """Undecided tracks whose centre has reached the decision line.

        Only tracks first seen upstream of the line: one born past it was missed by the detector
        until too late to sort, and is reported when it leaves the view (see `prune`).
        """
        return [t_ for t_ in self.tracks.values()
                if not t_.decided and t_.born_x_mm < decision_line_mm
                and t_.x_at(count, self.geom) >= decision_line_mm]

    def prune(self, count: int) -> list[Track]:
        """Drop tracks that have left the view, and undecided ones no longer seen (flicker).

        A decided track is kept until its item has left the view even when the detector loses
        it: were it dropped, the same item could come back as a new track and be sorted twice.
        Returns the undecided tracks dropped.
        """
        gone: list[Track] = []
        for tid in list(self.tracks):
            tr = self.tracks[tid]
            left = tr.x_at(count, self.geom) - tr.length_mm / 2 > self.view_length_mm
            lost = tr.missed > self.max_missed
            if left or (lost and not tr.decided):
                del self.tracks[tid]
                if not tr.decided:
                    gone.append(tr)
        return gone
