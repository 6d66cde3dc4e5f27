"""The simulated line's camera: renders what is under it, encoder-triggered.

Frames are stamped with the encoder count at capture, as a camera triggered from the encoder
would be, so the belt position of every pixel is exact. In real-time mode `read()` paces itself
to the frame rate; in virtual time the driver calls `render_at` for each frame time.
"""
from __future__ import annotations

import math
import time

import cv2
import numpy as np

from station.clock import Clock, VirtualClock
from station.config import StationConfig
from station.simline.world import BeltWorld
from vision.frame import Frame
from vision.render.scene import FastCamera, Placement, composite, make_belt_texture, random_belt_style, random_camera_look


class SimCamera:
    def __init__(self, cfg: StationConfig, world: BeltWorld, clock: Clock, seed: int | None = None):
        self.cfg = cfg
        self.world = world
        self.clock = clock
        rng = np.random.default_rng((cfg.sim.seed if seed is None else seed) + 7919)
        W, H = cfg.camera.width, cfg.camera.height
        self.W, self.H = W, H
        self.period = 1.0 / cfg.camera.fps
        self.tex_len = 4 * W
        self.belt = make_belt_texture(self.tex_len, H, random_belt_style(rng, wide=False), rng)
        blur = cfg.line.belt_speed_mm_s * cfg.camera.exposure_ms / 1000 * cfg.camera.px_per_mm
        self.look = random_camera_look(H, W, rng, wide=False, blur_px=blur)
        self.fast = FastCamera(self.look, rng)
        self._seq = 0
        self._next_t = clock.now()
        self.last_truth: list[tuple[str, tuple[float, float, float, float]]] = []
        self.last_items: list[tuple[str, tuple[float, float, float, float], int]] = []   # kind, box, item id
        # a true camera model (sim.true_camera) re-images the ideal canvas through its lens and pose
        self.true_camera = None
        self._maps = None
        if cfg.sim.true_camera is not None:
            from station.simline.camera_model import TrueCamera

            self.true_camera = TrueCamera(cfg.sim.true_camera, W, H)
            self._maps = self.true_camera.canvas_maps(cfg.camera.px_per_mm)

    def _background(self, travel_mm: float) -> np.ndarray:
        # the belt moves downstream (+x in the image): the texture slice shifts left with travel
        off = int(round(travel_mm * self.cfg.camera.px_per_mm)) % self.tex_len
        start = (-off) % self.tex_len
        if start + self.W <= self.tex_len:
            return self.belt[:, start:start + self.W]
        k = self.tex_len - start
        return np.concatenate([self.belt[:, start:], self.belt[:, :self.W - k]], axis=1)

    def render_at(self, t: float) -> Frame:
        w = self.world
        w.supply()
        travel = w.travel_mm(t)
        ppm = self.cfg.camera.px_per_mm
        places = []
        truth: list[tuple[str, tuple[float, float, float, float]]] = []
        items: list[tuple[str, tuple[float, float, float, float], int]] = []
        for it in w.visible(travel):
            if it.sprite is None:
                continue
            h, wd = it.sprite.alpha.shape
            cx = (it.u_mm + travel) * ppm
            cy = it.y_mm * ppm
            p = Placement(it.sprite, int(round(cx - wd / 2)), int(round(cy - h / 2)))
            places.append(p)
            # the item's own box first (a distractor's too: `last_items`), then its parts (attached cells)
            for k, (name, (x0, y0, x1, y1)) in enumerate([(it.spec.kind, it.sprite.box), *it.sprite.parts]):
                if self.true_camera is not None:   # the box as the true camera sees it
                    x0, y0, x1, y1 = self._true_box(x0 + p.x, y0 + p.y, x1 + p.x, y1 + p.y)
                    x0, y0, x1, y1 = x0 - p.x, y0 - p.y, x1 - p.x, y1 - p.y
                bx = (max(0.0, x0 + p.x), max(0.0, y0 + p.y), min(float(self.W), x1 + p.x), min(float(self.H), y1 + p.y))
                if bx[2] - bx[0] > 2 and bx[3] - bx[1] > 2:
                    if k == 0:
                        items.append((name, bx, it.id))
                    if k > 0 or it.spec.is_target:
                        truth.append((name, bx))
        self.last_truth = truth   # exact labels of the last frame: for tests and dataset capture
        self.last_items = items   # every item's own box, distractors included: for benches that score them
        img = composite(self._background(travel), places, self.look)
        if self._maps is not None:
            img = cv2.remap(img, self._maps[0], self._maps[1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        img = self.fast.apply(img)
        self._seq += 1
        count = int(math.floor(travel / w.mpc + 1e-9))
        return Frame(self._seq, int(round(t * 1e9)), img, count)

    def _true_box(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        """An ideal-canvas box re-imaged by the true camera: the bounding box of its sampled outline."""
        ppm = self.cfg.camera.px_per_mm
        t = np.linspace(0.0, 1.0, 5)
        xs = np.r_[x0 + (x1 - x0) * t, np.full(5, x1), x1 - (x1 - x0) * t, np.full(5, x0)]
        ys = np.r_[np.full(5, y0), y0 + (y1 - y0) * t, np.full(5, y1), y1 - (y1 - y0) * t]
        px = self.true_camera.belt_to_px(np.c_[xs, ys] / ppm)
        return float(px[:, 0].min()), float(px[:, 1].min()), float(px[:, 0].max()), float(px[:, 1].max())

    def read(self) -> Frame:
        """Real time: wait for the next frame slot, then render the belt as it is now."""
        if isinstance(self.clock, VirtualClock):
            raise RuntimeError("SimCamera.read() is for real time; virtual-time drivers call render_at()")
        now = self.clock.now()
        if self._next_t > now:
            time.sleep(self._next_t - now)
        self._next_t = max(self._next_t + self.period, self.clock.now() - self.period)
        return self.render_at(self.clock.now())

    def close(self) -> None:
        pass
