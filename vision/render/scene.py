"""Compose items on a belt and pass the result through a camera.

The belt texture is belt-fixed (it moves with the items), the lighting and the sensor are
camera-fixed: keeping those apart is what makes the simulated camera cheap (sprites are drawn
once per item, a frame is a texture slice plus alpha blits) and what makes the training images
honest (the same item is seen under the lighting of wherever it is in the view).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from vision.render.items import Sprite

Rng = np.random.Generator


@dataclass(frozen=True)
class BeltStyle:
    base_bgr: tuple[int, int, int]
    grain: float            # texture noise amplitude
    streaks: int            # longitudinal wear marks per 1000 px
    dirt: int               # dirt spots per megapixel
    seam_every_px: int      # 0: no seam in this texture


@dataclass(frozen=True)
class CameraLook:
    """What the camera does to the scene: lighting, sensor and optics."""

    gain_map: np.ndarray           # HxW float32 multiplicative lighting (vignetting, gradients)
    tint: tuple[float, float, float]
    noise_sigma: float
    blur_px: float                 # motion blur length along the belt, px
    defocus_sigma: float
    jpeg_quality: int              # 0: no JPEG round trip
    shadow_offset: tuple[int, int]
    shadow_strength: float
    glare: float = 0.0


def random_belt_style(rng: Rng, wide: bool = True) -> BeltStyle:
    if wide:
        bases = [(38, 38, 40), (25, 25, 25), (60, 62, 60), (70, 90, 55), (95, 70, 45), (110, 110, 110), (45, 55, 70)]
        base = bases[int(rng.integers(len(bases)))]
        base = tuple(int(np.clip(c * rng.uniform(0.8, 1.25), 0, 255)) for c in base)
    else:
        base = (38, 38, 40)
    return BeltStyle(base_bgr=base, grain=float(rng.uniform(3, 12)), streaks=int(rng.integers(0, 8)),
                     dirt=int(rng.integers(0, 60)), seam_every_px=int(rng.choice([0, 0, 1800, 2600])))


def make_belt_texture(width_px: int, height_px: int, style: BeltStyle, rng: Rng) -> np.ndarray:
    """A belt strip `width_px` long (along the belt) and `height_px` across."""
    tex = np.empty((height_px, width_px, 3), np.float32)
    tex[:] = style.base_bgr
    grain = rng.normal(0, style.grain, (height_px, width_px)).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 1.0) * 1.5
    tex += grain[..., None]
    for _ in range(int(style.streaks * width_px / 1000)):
        y = int(rng.uniform(0, height_px))
        x0 = int(rng.uniform(0, width_px))
        ln = int(rng.uniform(100, 800))
        d = rng.uniform(-14, 14)
        cv2.line(tex, (x0, y), (x0 + ln, y), tuple(float(c + d) for c in style.base_bgr), int(rng.integers(1, 3)))
    for _ in range(int(style.dirt * width_px * height_px / 1e6)):
        c = (int(rng.uniform(0, width_px)), int(rng.uniform(0, height_px)))
        r = int(rng.uniform(2, 14))
        tone = rng.uniform(0.5, 1.6)  # dust, grease, mud: darker or lighter than the belt, hardly coloured
        col = tuple(float(np.clip(c * tone + rng.uniform(-6, 6), 0, 255)) for c in style.base_bgr)
        cv2.circle(tex, c, r, col, -1, cv2.LINE_AA)
    if style.seam_every_px:
        for x in range(int(rng.uniform(0, style.seam_every_px)), width_px, style.seam_every_px):
            for k in range(3):
                cv2.line(tex, (x + k * 4, 0), (x + k * 4 + 30, height_px), tuple(c * 0.7 for c in style.base_bgr), 2)
    return np.clip(tex, 0, 255).astype(np.uint8)


def make_gain_map(h: int, w: int, rng: Rng, wide: bool = True) -> np.ndarray:
    """Lighting as a multiplicative map: a directional gradient, vignetting and maybe a hot spot."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xn, yn = xx / w - 0.5, yy / h - 0.5
    level = rng.uniform(0.75, 1.25) if wide else rng.uniform(0.95, 1.05)
    ang = rng.uniform(0, 2 * np.pi)
    grad = rng.uniform(0, 0.35) if wide else 0.08
    g = level * (1 + grad * (np.cos(ang) * xn + np.sin(ang) * yn))
    vig = rng.uniform(0.0, 0.35) if wide else 0.12
    g *= 1 - vig * (xn ** 2 + yn ** 2) * 2
    if wide and rng.random() < 0.3:   # specular hot spot from a lamp
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        r = rng.uniform(0.1, 0.3) * w
        g += rng.uniform(0.1, 0.4) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    return g.astype(np.float32)


def random_camera_look(h: int, w: int, rng: Rng, wide: bool = True, blur_px: float | None = None) -> CameraLook:
    tint = tuple(float(rng.uniform(0.88, 1.12)) for _ in range(3)) if wide else (1.0, 1.0, 1.0)
    ang = rng.uniform(0, 2 * np.pi)
    off = rng.uniform(2, 9)
    return CameraLook(
        gain_map=make_gain_map(h, w, rng, wide),
        tint=tint,  # type: ignore[arg-type]
        noise_sigma=float(rng.uniform(1, 7) if wide else 2.0),
        blur_px=float(blur_px if blur_px is not None else (rng.uniform(0, 10) if wide else 0.0)),
        defocus_sigma=float(rng.uniform(0, 1.1) if wide and rng.random() < 0.4 else 0.0),
        jpeg_quality=int(rng.integers(40, 95)) if wide and rng.random() < 0.6 else 0,
        shadow_offset=(int(np.cos(ang) * off), int(np.sin(ang) * off)),
        shadow_strength=float(rng.uniform(0.25, 0.6)),
    )


@dataclass
class Placement:
    sprite: Sprite
    x: int      # top-left of the sprite in the image, px (may be negative: partly outside)
    y: int


def _clip(x: int, y: int, h: int, w: int, H: int, W: int):
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return None
    return (y0, y1, x0, x1), (y0 - y, y1 - y, x0 - x, x1 - x)


def composite(background: np.ndarray, placements: list[Placement], look: CameraLook) -> np.ndarray:
    """Blend sprites (in order: later ones lie on top) with soft shadows onto a copy of `background`."""
    img = background.copy()
    H, W = img.shape[:2]
    sdx, sdy = look.shadow_offset
    for p in placements:
        sp = p.sprite
        pad = (sp.shadow.shape[0] - sp.alpha.shape[0]) // 2
        hh, ww = sp.shadow.shape
        c = _clip(p.x - pad + sdx, p.y - pad + sdy, hh, ww, H, W)
        if c is not None:
            (a0, a1, b0, b1), (s0, s1, t0, t1) = c
            roi = img[a0:a1, b0:b1]
            k = 1.0 - look.shadow_strength * sp.shadow[s0:s1, t0:t1]
            cv2.multiply(roi, cv2.merge([k, k, k]), dst=roi, dtype=cv2.CV_8U)
        h, w = sp.alpha.shape
        c = _clip(p.x, p.y, h, w, H, W)
        if c is None:
            continue
        (a0, a1, b0, b1), (s0, s1, t0, t1) = c
        roi = img[a0:a1, b0:b1]
        a = sp.alpha3[s0:s1, t0:t1]
        # roi = roi * (1 - a) + sprite * a, in float32 by OpenCV's SIMD kernels
        blended = cv2.add(cv2.multiply(roi, 1.0 - a, dtype=cv2.CV_32F), sp.premul[s0:s1, t0:t1])
        np.copyto(roi, blended, casting="unsafe")
    return img


def apply_camera(img: np.ndarray, look: CameraLook, rng: Rng) -> np.ndarray:
    """Lighting, motion blur, defocus, sensor noise and compression, in the order light meets them."""
    out = img.astype(np.float32)
    out *= look.gain_map[..., None]
    out *= np.asarray(look.tint, np.float32)
    if look.blur_px >= 1.5:
        k = int(round(look.blur_px))
        out = cv2.blur(out, (k, 1))
    if look.defocus_sigma > 0.2:
        out = cv2.GaussianBlur(out, (0, 0), look.defocus_sigma)
    if look.noise_sigma > 0:
        out += rng.normal(0, look.noise_sigma, out.shape[:2]).astype(np.float32)[..., None]
    res = np.clip(out, 0, 255).astype(np.uint8)
    if look.jpeg_quality:
        ok, buf = cv2.imencode(".jpg", res, [cv2.IMWRITE_JPEG_QUALITY, look.jpeg_quality])
        if ok:
            res = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return res


class FastCamera:
    """The simulated line's camera: fixed lighting, precomputed noise, saturating uint8 arithmetic.

    `apply_camera` is right for training images; this is the same model made cheap enough to run
    at 30 fps beside the detector on two cores: lighting is one SIMD multiply by a cached 8-bit gain,
    motion blur a box filter, and noise a saturating add/subtract from a small bank of fields.
    """

    def __init__(self, look: CameraLook, rng: Rng, noise_bank: int = 4):
        self.look = look
        h, w = look.gain_map.shape
        gain = look.gain_map[..., None] * np.asarray(look.tint, np.float32)
        self._gain = np.clip(gain * 128, 0, 255).astype(np.uint8)    # gain in 1/128 steps, up to 2x
        self._gain = np.ascontiguousarray(np.broadcast_to(self._gain, (h, w, 3)))
        self._noise = []
        for _ in range(noise_bank):
            n = rng.normal(0, look.noise_sigma, (h, w, 1)).clip(-127, 127)
            pos = np.ascontiguousarray(np.broadcast_to(np.clip(n, 0, None).astype(np.uint8), (h, w, 3)))
            neg = np.ascontiguousarray(np.broadcast_to(np.clip(-n, 0, None).astype(np.uint8), (h, w, 3)))
            self._noise.append((pos, neg))
        self._i = 0

    def apply(self, img: np.ndarray) -> np.ndarray:
        out = cv2.multiply(img, self._gain, scale=1 / 128.0)
        if self.look.blur_px >= 1.5:
            out = cv2.blur(out, (int(round(self.look.blur_px)), 1))
        pos, neg = self._noise[self._i % len(self._noise)]
        self._i += 1
        cv2.add(out, pos, dst=out)
        cv2.subtract(out, neg, dst=out)
        return out
