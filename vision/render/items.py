"""What items look like from above, drawn at a physical scale.

One description of every item serves the simulated line and the training data, so the detector
is trained on exactly the world the simulator shows it — and the breadth of that world (sizes from
`shared/ITEMS.md`, colours, wraps, components, wear) is what prepares it for real photographs.

An item is first *sampled* (`sample_item`: physical size in mm and its look, from a seeded RNG),
then *drawn* (`draw_item`) into a `Sprite` at a given pixel scale and angle. Sprites carry an
alpha mask so the scene can composite, shadow and label them exactly.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np

Rng = np.random.Generator

TARGET_CLASSES = (
    "board_high", "board_low", "li_ion_cell", "li_ion_pack",
    "alkaline", "nimh", "coin_cell", "lead_acid",
)
DISTRACTORS = ("cable", "plastic_fragment", "screw")


@dataclass
class ItemSpec:
    """A physical item: what it is, how big (mm) and everything needed to draw it again."""

    kind: str                      # a target class name or a distractor name
    subtype: str
    length_mm: float               # along the sprite's x axis before rotation
    width_mm: float
    mass_g: float
    angle_deg: float
    seed: int                      # the look is re-drawable from this seed
    attached: "ItemSpec | None" = None   # a battery still fixed to a board
    attached_at: tuple[float, float] = (0.5, 0.5)  # fractional position on the board

    @property
    def is_target(self) -> bool:
        return self.kind in TARGET_CLASSES


@dataclass
class Sprite:
    """An item drawn and rotated: BGR, alpha (0..1), a soft shadow mask and exact label boxes."""

    bgr: np.ndarray
    alpha: np.ndarray
    shadow: np.ndarray
    box: tuple[float, float, float, float]           # tight box of the whole item, sprite px
    parts: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    _alpha3: np.ndarray | None = field(default=None, repr=False)
    _premul: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.alpha.shape[:2]

    @property
    def alpha3(self) -> np.ndarray:
        """Alpha repeated per channel (float32), cached: compositing reuses it every frame."""
        if self._alpha3 is None:
            self._alpha3 = np.ascontiguousarray(np.repeat(self.alpha[..., None], 3, axis=2))
        return self._alpha3

    @property
    def premul(self) -> np.ndarray:
        """Colour premultiplied by alpha (float32), cached."""
        if self._premul is None:
            self._premul = self.bgr.astype(np.float32) * self.alpha3
        return self._premul


# ---------------------------------------------------------------------------------------------
# sampling: physical sizes from ITEMS.md, varied
# ---------------------------------------------------------------------------------------------

def _u(rng: Rng, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


SUBTYPES: dict[str, tuple[str, ...]] = {
    "board_high": ("phone", "ram", "sodimm", "hdd", "mobo_small"),
    "board_low": ("psu", "tv", "small"),
    "li_ion_cell": ("18650", "21700"),
    "li_ion_pack": ("pouch", "phone", "laptop"),
    "alkaline": ("AA", "AAA", "C", "9V"),
    "nimh": ("AA", "AAA", "pack"),
    "coin_cell": ("CR2032", "CR2025", "CR1632", "button"),
    "lead_acid": ("6V1.2", "12V1.2", "12V2.3", "12V7"),
}
"""Every subtype a target class is drawn as (`sample_item`; `--subtype-weight` names them)."""


def _pick(rng: Rng, kind: str, subtypes: tuple[str, ...], p: list[float] | None,
          weights: Mapping[str, float] | None) -> str:
    """A subtype of `kind` at its share `p`, scaled by `weights["kind/subtype"]` where given.

    Without a weight for this kind the draw is the unweighted one, draw for draw, so a dataset
    made before weights existed is made again byte for byte.
    """
    keys = [f"{kind}/{s}" for s in subtypes]
    if weights and any(k in weights for k in keys):
        base = np.full(len(subtypes), 1.0 / len(subtypes)) if p is None else np.asarray(p, float)
        q = base * np.asarray([weights.get(k, 1.0) for k in keys], float)
        if not q.sum() > 0:
            raise ValueError(f"subtype weights {dict(weights)} leave no subtype of {kind} to draw")
        return str(rng.choice(subtypes, p=q / q.sum()))
    return str(rng.choice(subtypes) if p is None else rng.choice(subtypes, p=p))


def sample_item(kind: str, rng: Rng, attach_battery_p: float = 0.0,
                subtype_weights: Mapping[str, float] | None = None) -> ItemSpec:
    """Sample a physical item of `kind` (class or distractor name).

    `subtype_weights` ("alkaline/9V": 4.0) makes a look that a model misses more frequent in its
    training data without changing the class balance."""
    w = subtype_weights
    angle = _u(rng, 0, 360)
    seed = int(rng.integers(0, 2**31 - 1))
    if kind == "board_high":
        sub = _pick(rng, kind, SUBTYPES[kind], [0.3, 0.2, 0.15, 0.2, 0.15], w)
        dims = {
            "phone": (_u(rng, 60, 140), _u(rng, 30, 70), _u(rng, 20, 60)),
            "ram": (133.0, 31.0, _u(rng, 15, 25)),
            "sodimm": (68.0, 30.0, _u(rng, 10, 15)),
            "hdd": (_u(rng, 70, 100), _u(rng, 60, 100), _u(rng, 15, 30)),
            "mobo_small": (_u(rng, 170, 244), _u(rng, 150, 200), _u(rng, 300, 600)),
        }[sub]
    elif kind == "board_low":
        sub = _pick(rng, kind, SUBTYPES[kind], [0.4, 0.3, 0.3], w)
        dims = {
            "psu": (_u(rng, 120, 250), _u(rng, 80, 160), _u(rng, 150, 400)),
            "tv": (_u(rng, 150, 280), _u(rng, 100, 200), _u(rng, 200, 500)),
            "small": (_u(rng, 90, 140), _u(rng, 60, 100), _u(rng, 80, 200)),
        }[sub]
    elif kind == "li_ion_cell":
        sub = _pick(rng, kind, SUBTYPES[kind], [0.7, 0.3], w)
        dims = (65.0, 18.0, _u(rng, 45, 50)) if sub == "18650" else (70.0, 21.0, _u(rng, 65, 70))
    elif kind == "li_ion_pack":
        sub = _pick(rng, kind, SUBTYPES[kind], [0.4, 0.4, 0.2], w)
        dims = {
            "pouch": (_u(rng, 60, 120), _u(rng, 40, 80), _u(rng, 30, 90)),
            "phone": (_u(rng, 70, 150), _u(rng, 45, 100), _u(rng, 40, 150)),
            "laptop": (_u(rng, 200, 290), _u(rng, 40, 80), _u(rng, 250, 450)),
        }[sub]
    elif kind == "alkaline":
        sub = _pick(rng, kind, SUBTYPES[kind], [0.45, 0.25, 0.15, 0.15], w)
        dims = {"AA": (50.5, 14.5, 23.0), "AAA": (44.5, 10.5, 11.5), "C": (50.0, 26.2, 66.0),
                "9V": (48.5, 26.5, 45.0)}[sub]
    elif kind == "nimh":
        sub = _pick(rng, kind, SUBTYPES[kind], [0.5, 0.2, 0.3], w)
        if sub == "pack":
            n = int(rng.integers(2, 5))
            dims = (_u(rng, 44, 52), 14.5 * n + 2, 28.0 * n)
        else:
            dims = (50.5, 14.5, _u(rng, 26, 30)) if sub == "AA" else (44.5, 10.5, 12.0)
    elif kind == "coin_cell":
        sub = _pick(rng, kind, SUBTYPES[kind], [0.5, 0.2, 0.15, 0.15], w)
        d = {"CR2032": 20.0, "CR2025": 20.0, "CR1632": 16.0, "button": _u(rng, 9.5, 11.6)}[sub]
        dims = (d, d, 3.0 if d >= 16 else 1.0)
    elif kind == "lead_acid":
        sub = _pick(rng, kind, SUBTYPES[kind], None, w)
        dims = {"6V1.2": (97.0, 25.0, 300.0), "12V1.2": (97.0, 43.0, 570.0),
                "12V2.3": (178.0, 34.0, 900.0), "12V7": (151.0, 65.0, 2100.0)}[sub]
        dims = (dims[0] * _u(rng, 0.97, 1.03), dims[1] * _u(rng, 0.97, 1.03), dims[2])
    elif kind == "cable":
        sub = "cable"
        dims = (_u(rng, 60, 220), _u(rng, 3, 9), _u(rng, 5, 60))
    elif kind == "plastic_fragment":
        sub = "fragment"
        dims = (_u(rng, 35, 150), _u(rng, 25, 90), _u(rng, 5, 80))
    elif kind == "screw":
        sub = "screw"
        dims = (_u(rng, 8, 30), _u(rng, 3, 6), _u(rng, 1, 6))
    else:
        raise ValueError(f"unknown item kind {kind!r}; known: {TARGET_CLASSES + DISTRACTORS}")
    spec = ItemSpec(kind=kind, subtype=sub, length_mm=float(dims[0]), width_mm=float(dims[1]),
                    mass_g=float(dims[2]), angle_deg=angle, seed=seed)
    if kind in ("board_high", "board_low") and attach_battery_p > 0 and rng.random() < attach_battery_p:
        if spec.length_mm >= 60 and spec.width_mm >= 30:
            akind = str(rng.choice(["coin_cell", "li_ion_cell", "li_ion_pack", "nimh"], p=[0.5, 0.2, 0.15, 0.15]))
            att = sample_item(akind, rng, subtype_weights=w)
            # an attached battery must fit on the board
            scale = min(1.0, 0.6 * spec.length_mm / att.length_mm, 0.6 * spec.width_mm / max(att.width_mm, 1))
            att.length_mm *= scale
            att.width_mm *= scale
            att.angle_deg = float(rng.choice([0.0, 90.0, 180.0, 270.0])) + _u(rng, -8, 8)
            spec.attached = att
            spec.attached_at = (_u(rng, 0.3, 0.7), _u(rng, 0.3, 0.7))
            spec.mass_g += att.mass_g
    return spec


# ---------------------------------------------------------------------------------------------
# drawing helpers
# ---------------------------------------------------------------------------------------------

def _color(rng: Rng, base: tuple[int, int, int], jitter: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in base)  # type: ignore[return-value]


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    px = np.uint8([[[int(h) % 180, int(s), int(v)]]])
    b, g, r = cv2.cvtColor(px, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _rect(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, thickness: int = -1) -> None:
    cv2.rectangle(img, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), color, thickness,
                  cv2.LINE_AA)


def _cylinder_shading(h: int, w: int, axis_along_x: bool = True, strength: float = 0.45) -> np.ndarray:
    """Brightness profile across a cylinder seen from above: bright ridge, dark flanks."""
    n = h if axis_along_x else w
    t = np.linspace(-1, 1, max(n, 2), dtype=np.float32)
    prof = 1.0 - strength * (t ** 2) + 0.25 * np.exp(-((t + 0.35) ** 2) / 0.02)
    return (prof[:, None] if axis_along_x else prof[None, :]).astype(np.float32)


def _texture_noise(img: np.ndarray, rng: Rng, amount: float) -> None:
    if amount <= 0:
        return
    noise = rng.normal(0, amount, img.shape[:2]).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), 1.2)
    img[:] = np.clip(img.astype(np.float32) + noise[..., None], 0, 255).astype(np.uint8)


def _text_marks(img: np.ndarray, rng: Rng, x0: float, y0: float, x1: float, y1: float, color, rows: int) -> None:
    """Printed text seen too small to read: rows of short dashes."""
    hgt = (y1 - y0) / max(rows, 1)
    for r in range(rows):
        y = y0 + (r + 0.5) * hgt
        x = x0
        while x < x1:
            ln = rng.uniform(0.03, 0.12) * (x1 - x0)
            xe = min(x + ln, x1)
            cv2.line(img, (int(x), int(y)), (int(xe), int(y)), color, max(1, int(hgt * 0.35)), cv2.LINE_AA)
            x = xe + rng.uniform(0.02, 0.05) * (x1 - x0)


# ---------------------------------------------------------------------------------------------
# per-kind painters: draw axis-aligned into (canvas, mask); size in px is (L, W)
# ---------------------------------------------------------------------------------------------

def _paint_board_high(img, mask, spec: ItemSpec, s: float, rng: Rng) -> None:
    L, W = img.shape[1], img.shape[0]
    mask[:] = 255
    mask_color = [(40, 110, 30), (120, 60, 20), (25, 25, 25), (40, 130, 60), (30, 30, 140), (70, 90, 20)]
    base = _color(rng, mask_color[int(rng.integers(len(mask_color)))], 15)
    img[:] = base
    # traces
    for _ in range(int(L * W / 400)):
        x, y = rng.uniform(0, L), rng.uniform(0, W)
        dx, dy = (rng.uniform(10, 60), 0) if rng.random() < 0.5 else (0, rng.uniform(10, 60))
        c = tuple(int(min(255, v * 1.25 + 10)) for v in base)
        cv2.line(img, (int(x), int(y)), (int(x + dx), int(y + dy)), c, 1, cv2.LINE_AA)
    # dense small SMD parts
    for _ in range(int(L * W * rng.uniform(0.004, 0.010))):
        x, y = rng.uniform(0, L), rng.uniform(0, W)
        w, h = rng.uniform(0.6, 2.0) * s, rng.uniform(0.4, 1.2) * s
        c = _color(rng, (60, 60, 60) if rng.random() < 0.5 else (150, 150, 160), 30)
        _rect(img, x, y, x + w, y + h, c)
    # ICs: black packages with pins
    n_ic = int(rng.integers(3, 9) + L * W / (900 * s * s))
    for _ in range(n_ic):
        w, h = rng.uniform(5, 22) * s, rng.uniform(5, 18) * s
        x, y = rng.uniform(0, max(1, L - w)), rng.uniform(0, max(1, W - h))
        pin = (170, 170, 175)
        _rect(img, x - 0.8 * s, y - 0.8 * s, x + w + 0.8 * s, y + h + 0.8 * s, pin)
        _rect(img, x, y, x + w, y + h, _color(rng, (22, 22, 24), 8))
        if rng.random() < 0.5:
            cv2.circle(img, (int(x + 2 * s), int(y + 2 * s)), max(1, int(0.6 * s)), (70, 70, 70), -1)
    # shield cans
    for _ in range(int(rng.integers(0, 3))):
        w, h = rng.uniform(10, 35) * s, rng.uniform(10, 30) * s
        x, y = rng.uniform(0, max(1, L - w)), rng.uniform(0, max(1, W - h))
        c = _color(rng, (185, 185, 190), 15)
        _rect(img, x, y, x + w, y + h, c)
        _rect(img, x, y, x + w, y + h, tuple(int(v * 0.7) for v in c), max(1, int(0.5 * s)))
    # gold edge fingers (RAM) or gold contacts
    gold = _color(rng, (60, 175, 215), 15)
    if spec.subtype in ("ram", "sodimm"):
        pitch = 1.0 * s
        y0 = W - 3.5 * s
        x = 3 * s
        while x < L - 3 * s:
            _rect(img, x, y0, x + 0.6 * pitch, W - 0.5 * s, gold)
            x += pitch
    else:
        for _ in range(int(rng.integers(2, 8))):
            x, y = rng.uniform(0, L - 6 * s), rng.uniform(0, W - 3 * s)
            _rect(img, x, y, x + rng.uniform(2, 8) * s, y + rng.uniform(1, 3) * s, gold)
    # mounting holes
    for cx, cy in ((3 * s, 3 * s), (L - 3 * s, 3 * s), (3 * s, W - 3 * s), (L - 3 * s, W - 3 * s)):
        if rng.random() < 0.6:
            cv2.circle(img, (int(cx), int(cy)), max(1, int(1.5 * s)), gold, -1, cv2.LINE_AA)
            cv2.circle(img, (int(cx), int(cy)), max(1, int(0.8 * s)), (10, 10, 10), -1, cv2.LINE_AA)
    # silkscreen
    _text_marks(img, rng, 0.05 * L, 0.05 * W, 0.5 * L, 0.12 * W, (235, 235, 235), 1)


def _paint_board_low(img, mask, spec: ItemSpec, s: float, rng: Rng) -> None:
    L, W = img.shape[1], img.shape[0]
    mask[:] = 255
    base = _color(rng, [(60, 110, 150), (50, 95, 135), (70, 130, 165), (60, 120, 80)][int(rng.integers(4))], 15)
    img[:] = base
    _texture_noise(img, rng, 5)
    # solder traces on a single-sided board: thick, wandering, pale
    for _ in range(int(L * W / 900)):
        pts = np.cumsum(rng.normal(0, 6 * s, (4, 2)), axis=0) + [rng.uniform(0, L), rng.uniform(0, W)]
        cv2.polylines(img, [pts.astype(np.int32)], False, tuple(int(v * 0.8) for v in base), max(1, int(s)),
                      cv2.LINE_AA)
    # electrolytic capacitors: circles with a vent cross
    for _ in range(int(rng.integers(2, 7))):
        r = rng.uniform(4, 13) * s
        cx, cy = rng.uniform(r, max(r + 1, L - r)), rng.uniform(r, max(r + 1, W - r))
        c = _color(rng, [(120, 50, 20), (30, 30, 30), (40, 90, 40), (130, 110, 40)][int(rng.integers(4))], 15)
        cv2.circle(img, (int(cx), int(cy)), int(r), c, -1, cv2.LINE_AA)
        cv2.circle(img, (int(cx), int(cy)), int(r * 0.8), (175, 175, 180), -1, cv2.LINE_AA)
        cv2.line(img, (int(cx - r * 0.5), int(cy)), (int(cx + r * 0.5), int(cy)), (90, 90, 90), max(1, int(0.5 * s)))
        cv2.line(img, (int(cx), int(cy - r * 0.5)), (int(cx), int(cy + r * 0.5)), (90, 90, 90), max(1, int(0.5 * s)))
    # transformer: yellow tape block with copper
    if rng.random() < 0.75:
        w, h = rng.uniform(20, 40) * s, rng.uniform(18, 35) * s
        x, y = rng.uniform(0, max(1, L - w)), rng.uniform(0, max(1, W - h))
        _rect(img, x, y, x + w, y + h, _color(rng, (40, 40, 45), 10))
        _rect(img, x + 0.2 * w, y + 0.1 * h, x + 0.8 * w, y + 0.9 * h, _color(rng, (60, 190, 220), 20))
        _rect(img, x + 0.35 * w, y + 0.1 * h, x + 0.65 * w, y + 0.9 * h, _color(rng, (50, 110, 185), 15))
    # heat sink: aluminium with fins
    if rng.random() < 0.7:
        w, h = rng.uniform(25, 60) * s, rng.uniform(10, 25) * s
        x, y = rng.uniform(0, max(1, L - w)), rng.uniform(0, max(1, W - h))
        c = _color(rng, (175, 175, 170), 15)
        _rect(img, x, y, x + w, y + h, c)
        step = max(2, int(2.5 * s))
        for xx in range(int(x), int(x + w), step):
            cv2.line(img, (xx, int(y)), (xx, int(y + h)), tuple(int(v * 0.65) for v in c), 1)
    # through-hole resistors and diodes
    for _ in range(int(rng.integers(3, 12))):
        x, y = rng.uniform(0, L - 10 * s), rng.uniform(0, W - 3 * s)
        _rect(img, x, y, x + 7 * s, y + 2.2 * s, _color(rng, (150, 190, 215), 20))
        for k in range(3):
            bx = x + (1.5 + 1.5 * k) * s
            _rect(img, bx, y, bx + 0.6 * s, y + 2.2 * s, _color(rng, (40, 40, 160), 60))
    # few ICs
    for _ in range(int(rng.integers(0, 3))):
        w, h = rng.uniform(8, 20) * s, rng.uniform(6, 9) * s
        x, y = rng.uniform(0, max(1, L - w)), rng.uniform(0, max(1, W - h))
        _rect(img, x, y, x + w, y + h, (25, 25, 25))
    _text_marks(img, rng, 0.55 * L, 0.85 * W, 0.95 * L, 0.95 * W, (230, 230, 230), 1)


def _paint_cylinder(img, mask, s: float, rng: Rng, wrap, accent=None, end_metal=True, worn: float = 0.0) -> None:
    """A cell lying on its side: length along x, diameter along y."""
    L, W = img.shape[1], img.shape[0]
    r = W / 2
    mask[:] = 0
    cv2.rectangle(mask, (int(r * 0.25), 0), (L - 1 - int(r * 0.25), W - 1), 255, -1)
    cv2.ellipse(mask, (int(r * 0.25), int(r)), (int(r * 0.25), int(r)), 0, 90, 270, 255, -1)
    cv2.ellipse(mask, (L - 1 - int(r * 0.25), int(r)), (int(r * 0.25), int(r)), 0, -90, 90, 255, -1)
    img[:] = wrap
    if accent is not None:
        a0 = int(L * rng.uniform(0.45, 0.75))
        img[:, a0:] = accent
    # label band and print
    if rng.random() < 0.8:
        _text_marks(img, rng, 0.15 * L, 0.3 * W, 0.8 * L, 0.7 * W, _color(rng, (235, 235, 235), 20)
                    if np.mean(wrap) < 128 else (30, 30, 30), 2)
    if end_metal:
        metal = _color(rng, (185, 185, 190), 12)
        cap = max(2, int(2.0 * s))
        img[:, :cap] = metal
        img[:, L - cap:] = tuple(int(v * 0.9) for v in metal)
        nub_w = max(1, int(1.0 * s))
        cv2.rectangle(img, (L - cap - nub_w, int(W * 0.3)), (L - cap, int(W * 0.7)), metal, -1)
    if worn > 0:  # torn wrap shows the bare can
        for _ in range(int(rng.integers(1, 4))):
            x = rng.uniform(0.2, 0.8) * L
            w = rng.uniform(3, 12) * s
            cv2.ellipse(img, (int(x), int(rng.uniform(0.2, 0.8) * W)), (int(w), int(W * rng.uniform(0.15, 0.4))),
                        rng.uniform(0, 180), 0, 360, (170, 172, 178), -1, cv2.LINE_AA)
    shade = _cylinder_shading(W, L)
    img[:] = np.clip(img.astype(np.float32) * shade[..., None], 0, 255).astype(np.uint8)


def _paint_li_ion_cell(img, mask, spec, s, rng) -> None:
    hue = rng.uniform(0, 180)
    wrap = _hsv(hue, rng.uniform(80, 255), rng.uniform(60, 230))
    _paint_cylinder(img, mask, s, rng, wrap, worn=float(rng.random() < 0.25))
    # white insulator ring at the positive end (a Li-ion tell)
    L, W = img.shape[1], img.shape[0]
    cap = max(2, int(2.0 * s))
    cv2.line(img, (L - cap - 1, 1), (L - cap - 1, W - 2), (225, 225, 225), max(1, int(0.8 * s)))


def _paint_alkaline(img, mask, spec, s, rng) -> None:
    if spec.subtype == "9V":
        L, W = img.shape[1], img.shape[0]
        mask[:] = 255
        body = [(30, 30, 30), (20, 120, 200), (40, 40, 160), (160, 90, 20), (200, 200, 200)][int(rng.integers(5))]
        img[:] = _color(rng, body, 12)
        _rect(img, 0, 0, 4 * s, W - 1, (175, 175, 180))
        cv2.circle(img, (int(2.2 * s), int(W * 0.28)), max(2, int(3.2 * s)), (200, 200, 205), -1, cv2.LINE_AA)
        pts = cv2.ellipse2Poly((int(2.2 * s), int(W * 0.72)), (int(3.8 * s), int(3.8 * s)), 0, 0, 360, 60)
        cv2.fillConvexPoly(img, pts, (200, 200, 205), cv2.LINE_AA)
        _text_marks(img, rng, 0.3 * L, 0.25 * W, 0.9 * L, 0.75 * W, (230, 230, 230), 3)
        return
    schemes = [((25, 25, 25), (40, 110, 200)), ((30, 30, 30), (20, 160, 230)), ((170, 90, 30), (200, 200, 200)),
               ((40, 40, 180), (60, 190, 230)), ((30, 140, 40), (225, 225, 225)), ((150, 40, 120), (30, 30, 30))]
    wrap, accent = schemes[int(rng.integers(len(schemes)))]
    _paint_cylinder(img, mask, s, rng, _color(rng, wrap, 12), _color(rng, accent, 12), worn=float(rng.random() < 0.1))


def _paint_nimh(img, mask, spec, s, rng) -> None:
    if spec.subtype == "pack":
        L, W = img.shape[1], img.shape[0]
        mask[:] = 0
        n = max(2, int(round(spec.width_mm / 14.5)))
        cell_w = W / n
        sub = np.zeros((int(cell_w), L, 3), np.uint8)
        submask = np.zeros((int(cell_w), L), np.uint8)
        wrap = _color(rng, [(60, 140, 40), (210, 210, 210), (150, 100, 30), (60, 60, 200)][int(rng.integers(4))], 12)
        for k in range(n):
            _paint_cylinder(sub, submask, s, rng, wrap)
            y0 = int(k * cell_w)
            h = min(sub.shape[0], W - y0)
            img[y0:y0 + h] = sub[:h]
            mask[y0:y0 + h] = submask[:h]
        # shrink wrap film over the whole pack, and the lead wires
        film = _color(rng, [(200, 120, 40), (220, 220, 220), (40, 40, 200)][int(rng.integers(3))], 15)
        img[:] = cv2.addWeighted(img, 0.6, np.full_like(img, film), 0.4, 0)
        mask[:] = np.maximum(mask, cv2.dilate(mask, np.ones((3, 3), np.uint8)))
        for c, off in (((30, 30, 200), 0.35), ((25, 25, 25), 0.65)):
            cv2.line(img, (L - 1, int(W * off)), (int(L * 0.75), int(W * off)), c, max(1, int(1.2 * s)))
        return
    wrap = _color(rng, [(60, 140, 40), (220, 220, 220), (160, 160, 160), (170, 110, 40), (60, 60, 60)][int(rng.integers(5))], 15)
    accent = _color(rng, (40, 170, 60), 20) if rng.random() < 0.4 else None
    _paint_cylinder(img, mask, s, rng, wrap, accent)


def _paint_coin(img, mask, spec, s, rng) -> None:
    L, W = img.shape[1], img.shape[0]
    c = (L // 2, W // 2)
    r = min(L, W) // 2 - 1
    mask[:] = 0
    cv2.circle(mask, c, r, 255, -1, cv2.LINE_AA)
    yy, xx = np.mgrid[0:W, 0:L].astype(np.float32)
    lx, ly = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5)
    d = np.sqrt((xx - c[0] - lx * r) ** 2 + (yy - c[1] - ly * r) ** 2) / max(r, 1)
    base = rng.uniform(150, 200)
    v = np.clip(base + 60 * np.exp(-d * 2.5) - 25 * d, 0, 255)
    img[:] = np.stack([v * 1.02, v, v * 0.97], -1).clip(0, 255).astype(np.uint8)
    cv2.circle(img, c, int(r * 0.85), (120, 120, 125), max(1, int(0.4 * s)), cv2.LINE_AA)
    if r > 12:
        _text_marks(img, rng, c[0] - r * 0.5, c[1] - r * 0.3, c[0] + r * 0.5, c[1] + r * 0.3, (95, 95, 100), 2)


def _paint_li_ion_pack(img, mask, spec, s, rng) -> None:
    L, W = img.shape[1], img.shape[0]
    mask[:] = 255
    if spec.subtype == "laptop":
        img[:] = _color(rng, (35, 35, 38), 8)
        _texture_noise(img, rng, 3)
        _rect(img, 0.15 * L, 0.15 * W, 0.7 * L, 0.85 * W, _color(rng, (215, 215, 215), 25))
        _text_marks(img, rng, 0.18 * L, 0.22 * W, 0.67 * L, 0.78 * W, (40, 40, 40), 4)
        _rect(img, L - 8 * s, 0.35 * W, L - 1, 0.65 * W, (20, 20, 20))
        for k in range(5):
            y = 0.37 * W + k * 0.06 * W
            _rect(img, L - 6 * s, y, L - 2 * s, y + 0.03 * W, (60, 175, 210))
        return
    foil = [(200, 200, 205), (40, 40, 42), (190, 180, 170), (60, 60, 150)][int(rng.integers(4))]
    img[:] = _color(rng, foil, 10)
    # crinkled foil highlights
    for _ in range(int(L * W / 600)):
        x, y = rng.uniform(0, L), rng.uniform(0, W)
        cv2.line(img, (int(x), int(y)), (int(x + rng.normal(0, 8 * s)), int(y + rng.normal(0, 8 * s))),
                 _color(rng, tuple(min(255, v + 35) for v in foil), 10), 1, cv2.LINE_AA)
    # printed label
    lab = _color(rng, [(230, 230, 230), (160, 90, 20), (30, 30, 30)][int(rng.integers(3))], 15)
    _rect(img, 0.1 * L, 0.15 * W, 0.8 * L, 0.85 * W, lab)
    _text_marks(img, rng, 0.15 * L, 0.25 * W, 0.75 * L, 0.75 * W, (40, 40, 40) if np.mean(lab) > 120 else (220, 220, 220), 4)
    # flex connector: orange polyimide tab with gold contacts
    fx0 = L - 8 * s
    _rect(img, fx0, 0.4 * W, L - 1, 0.6 * W, (30, 120, 220))
    _rect(img, L - 4 * s, 0.43 * W, L - 1, 0.57 * W, (60, 175, 215))
    # protection circuit strip at one end
    _rect(img, 0, 0.05 * W, 6 * s, 0.95 * W, _color(rng, (40, 110, 30), 15))


def _paint_lead_acid(img, mask, spec, s, rng) -> None:
    L, W = img.shape[1], img.shape[0]
    mask[:] = 255
    img[:] = _color(rng, [(30, 30, 30), (90, 90, 90), (50, 50, 55)][int(rng.integers(3))], 10)
    _texture_noise(img, rng, 4)
    _rect(img, 1, 1, L - 2, W - 2, tuple(int(v) for v in _color(rng, (75, 75, 75), 10)), max(1, int(1.5 * s)))
    # top label, and the two spade terminals with their colour marks
    if rng.random() < 0.8:
        _rect(img, 0.2 * L, 0.15 * W, 0.8 * L, 0.85 * W, _color(rng, [(220, 220, 220), (40, 140, 40), (180, 120, 40)][int(rng.integers(3))], 20))
        _text_marks(img, rng, 0.25 * L, 0.25 * W, 0.75 * L, 0.75 * W, (30, 30, 30), 3)
    for x, col in ((0.07, (30, 30, 200)), (0.93, (25, 25, 25))):
        cx = x * L
        _rect(img, cx - 3 * s, 0.3 * W, cx + 3 * s, 0.7 * W, col)
        _rect(img, cx - 1 * s, 0.35 * W, cx + 1 * s, 0.65 * W, (185, 185, 190))


def _paint_cable(img, mask, spec, s, rng) -> None:
    L, W = img.shape[1], img.shape[0]
    mask[:] = 0
    thick = max(2, int(spec.width_mm * s))
    n = 6
    xs = np.linspace(thick, L - thick, n)
    ys = W / 2 + np.cumsum(rng.normal(0, W * 0.12, n))
    ys = np.clip(ys, thick, W - thick)
    pts = np.stack([xs, ys], -1).astype(np.int32)
    col = _color(rng, [(25, 25, 25), (200, 200, 200), (40, 40, 190), (170, 90, 30), (130, 130, 130)][int(rng.integers(5))], 12)
    cv2.polylines(mask, [pts], False, 255, thick, cv2.LINE_AA)
    cv2.polylines(img, [pts], False, col, thick, cv2.LINE_AA)
    cv2.polylines(img, [pts + [0, -max(1, thick // 4)]], False, tuple(min(255, v + 50) for v in col), max(1, thick // 4), cv2.LINE_AA)
    if rng.random() < 0.6:  # stripped copper end
        x0, y0 = pts[-1]
        cv2.line(img, (int(x0), int(y0)), (int(min(L - 1, x0 + thick)), int(y0)), (60, 120, 200), max(1, thick // 2))
        cv2.line(mask, (int(x0), int(y0)), (int(min(L - 1, x0 + thick)), int(y0)), 255, max(1, thick // 2))


def _paint_fragment(img, mask, spec, s, rng) -> None:
    L, W = img.shape[1], img.shape[0]
    mask[:] = 0
    k = int(rng.integers(5, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(0.55, 1.0, k)
    pts = np.stack([L / 2 + np.cos(ang) * rad * (L / 2 - 1), W / 2 + np.sin(ang) * rad * (W / 2 - 1)], -1).astype(np.int32)
    col = _color(rng, [(200, 210, 215), (30, 30, 30), (120, 120, 120), (220, 220, 225), (60, 80, 140)][int(rng.integers(5))], 15)
    cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
    img[:] = col
    for _ in range(int(rng.integers(1, 5))):  # moulded ribs and screw bosses
        if rng.random() < 0.5:
            y = int(rng.uniform(0.2, 0.8) * W)
            cv2.line(img, (0, y), (L, y), tuple(int(v * 0.8) for v in col), max(1, int(1.5 * s)))
        else:
            c = (int(rng.uniform(0.2, 0.8) * L), int(rng.uniform(0.2, 0.8) * W))
            cv2.circle(img, c, max(2, int(3 * s)), tuple(int(v * 0.75) for v in col), -1, cv2.LINE_AA)
            cv2.circle(img, c, max(1, int(1.2 * s)), tuple(int(v * 0.5) for v in col), -1, cv2.LINE_AA)
    _texture_noise(img, rng, 4)


def _paint_screw(img, mask, spec, s, rng) -> None:
    L, W = img.shape[1], img.shape[0]
    mask[:] = 0
    col = _color(rng, [(170, 170, 175), (90, 140, 175), (60, 60, 60)][int(rng.integers(3))], 12)
    head = max(2, W // 2)
    cv2.rectangle(mask, (head, W // 4), (L - 1, 3 * W // 4), 255, -1)
    cv2.circle(mask, (head, W // 2), head, 255, -1, cv2.LINE_AA)
    img[:] = col
    for x in range(head, L, max(2, int(0.8 * s))):
        cv2.line(img, (x, W // 4), (x, 3 * W // 4), tuple(int(v * 0.7) for v in col), 1)
    cv2.line(img, (head, W // 2 - head // 2), (head, W // 2 + head // 2), (40, 40, 40), 1)


_PAINTERS = {
    "board_high": _paint_board_high, "board_low": _paint_board_low, "li_ion_cell": _paint_li_ion_cell,
    "li_ion_pack": _paint_li_ion_pack, "alkaline": _paint_alkaline, "nimh": _paint_nimh,
    "coin_cell": _paint_coin, "lead_acid": _paint_lead_acid, "cable": _paint_cable,
    "plastic_fragment": _paint_fragment, "screw": _paint_screw,
}


# ---------------------------------------------------------------------------------------------
# sprite assembly
# ---------------------------------------------------------------------------------------------

def _paint_flat(spec: ItemSpec, px_per_mm: float, rng: Rng) -> tuple[np.ndarray, np.ndarray]:
    L = max(3, int(round(spec.length_mm * px_per_mm)))
    W = max(3, int(round(spec.width_mm * px_per_mm)))
    img = np.zeros((W, L, 3), np.uint8)
    mask = np.zeros((W, L), np.uint8)
    _PAINTERS[spec.kind](img, mask, spec, px_per_mm, rng)
    return img, mask


def _rotate(img: np.ndarray, masks: list[np.ndarray], angle: float) -> tuple[np.ndarray, list[np.ndarray]]:
    h, w = masks[0].shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(h * sin + w * cos)) + 2, int(np.ceil(h * cos + w * sin)) + 2
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    out = cv2.warpAffine(img, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    outm = [cv2.warpAffine(mk, m, (nw, nh), flags=cv2.INTER_LINEAR, borderValue=0) for mk in masks]
    return out, outm


def _tight_box(mask: np.ndarray, thresh: int = 127) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask > thresh)
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def draw_item(spec: ItemSpec, px_per_mm: float, shadow_blur_px: float = 4.0) -> Sprite:
    """Draw `spec` at `px_per_mm`, rotated by its angle. Deterministic in `spec.seed`."""
    rng = np.random.default_rng(spec.seed)
    img, mask = _paint_flat(spec, px_per_mm, rng)
    part_masks: list[np.ndarray] = []
    if spec.attached is not None:
        a = spec.attached
        arng = np.random.default_rng(a.seed)
        aimg, amask = _paint_flat(a, px_per_mm, arng)
        aimg, (amask,) = _rotate(aimg, [amask], a.angle_deg)
        H, W = mask.shape
        ah, aw = amask.shape
        x0 = int(np.clip(spec.attached_at[0] * W - aw / 2, 0, max(0, W - aw)))
        y0 = int(np.clip(spec.attached_at[1] * H - ah / 2, 0, max(0, H - ah)))
        ah, aw = min(ah, H - y0), min(aw, W - x0)
        al = (amask[:ah, :aw].astype(np.float32) / 255.0)[..., None]
        roi = img[y0:y0 + ah, x0:x0 + aw]
        roi[:] = (roi * (1 - al) + aimg[:ah, :aw] * al).astype(np.uint8)
        pm = np.zeros_like(mask)
        pm[y0:y0 + ah, x0:x0 + aw] = amask[:ah, :aw]
        part_masks.append(pm)
    img, masks = _rotate(img, [mask] + part_masks, spec.angle_deg)
    alpha = masks[0].astype(np.float32) / 255.0
    pad = int(np.ceil(shadow_blur_px * 2))
    shadow = cv2.GaussianBlur(np.pad(alpha, pad), (0, 0), max(shadow_blur_px, 0.5))
    parts = []
    if spec.attached is not None:
        parts.append((spec.attached.kind, _tight_box(masks[1])))
    return Sprite(bgr=img, alpha=alpha, shadow=shadow, box=_tight_box(masks[0]), parts=parts)


def footprint_mm(spec: ItemSpec) -> tuple[float, float]:
    """Axis-aligned extent (along belt, across belt) in mm of the item at its angle."""
    if spec.kind == "coin_cell":   # round: its extent does not turn with it
        return (spec.length_mm, spec.width_mm)
    a = np.deg2rad(spec.angle_deg)
    c, s = abs(np.cos(a)), abs(np.sin(a))
    return (spec.length_mm * c + spec.width_mm * s, spec.length_mm * s + spec.width_mm * c)
