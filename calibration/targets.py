"""The printable ChArUco target: its definition, detection, and a PNG + PDF at a known physical scale.

Why ChArUco: every corner is identified by its neighbouring ArUco markers, so a target seen only in
part (at the image edge, half off the belt) still gives usable, correctly numbered corners — which is
what lets camera calibration reach the image corners where distortion is largest.

The PDF is written directly (one page, one lossless image, page size = the target's size in points),
so it prints 1:1 with "actual size" and needs no extra package.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

DICTIONARIES = {"4x4_100": cv2.aruco.DICT_4X4_100, "5x5_100": cv2.aruco.DICT_5X5_100,
                "5x5_250": cv2.aruco.DICT_5X5_250, "6x6_250": cv2.aruco.DICT_6X6_250}
MARGIN_MM = 10.0


@dataclass(frozen=True)
class TargetSpec:
    squares_x: int = 12
    squares_y: int = 8
    square_mm: float = 30.0
    marker_mm: float = 22.0
    dictionary: str = "5x5_100"

    def __post_init__(self) -> None:
        if self.squares_x < 3 or self.squares_y < 3:
            raise ValueError(f"a ChArUco target needs at least 3x3 squares, got {self.squares_x}x{self.squares_y}")
        if not 0 < self.marker_mm < self.square_mm:
            raise ValueError(f"marker_mm={self.marker_mm} must be between 0 and square_mm={self.square_mm}")
        if self.dictionary not in DICTIONARIES:
            raise ValueError(f"dictionary {self.dictionary!r}: allowed {sorted(DICTIONARIES)}")

    @property
    def size_mm(self) -> tuple[float, float]:
        return self.squares_x * self.square_mm, self.squares_y * self.square_mm

    def describe(self) -> str:
        return (f"ChArUco {self.squares_x}x{self.squares_y} squares of {self.square_mm:g} mm, markers "
                f"{self.marker_mm:g} mm, {self.dictionary}")

    def board(self) -> cv2.aruco.CharucoBoard:
        d = cv2.aruco.getPredefinedDictionary(DICTIONARIES[self.dictionary])
        return cv2.aruco.CharucoBoard((self.squares_x, self.squares_y), self.square_mm, self.marker_mm, d)

    def render(self, px_per_mm: float, margin_mm: float = 0.0) -> np.ndarray:
        """The board as a grayscale image, `px_per_mm` exactly, with a white margin."""
        w, h = self.size_mm
        size = (int(round(w * px_per_mm)), int(round(h * px_per_mm)))
        img = self.board().generateImage(size, marginSize=0, borderBits=1)
        m = int(round(margin_mm * px_per_mm))
        return cv2.copyMakeBorder(img, m, m, m, m, cv2.BORDER_CONSTANT, value=255) if m else img


@dataclass
class Detection:
    """Corners of the target found in one image: their ids, pixels, and target-plane mm."""
    ids: np.ndarray        # (N,)
    px: np.ndarray         # (N, 2) image pixels
    obj_mm: np.ndarray     # (N, 2) target-plane mm (x along squares_x, y along squares_y)

    def __len__(self) -> int:
        return len(self.ids)


class TargetDetector:
    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self.board = spec.board()
        self._det = cv2.aruco.CharucoDetector(self.board)
        self._obj = np.asarray(self.board.getChessboardCorners(), np.float64)[:, :2]

    def detect(self, image: np.ndarray) -> Detection | None:
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        corners, ids, _, _ = self._det.detectBoard(gray)
        if ids is None or len(ids) < 6:
            return None
        ids = ids.ravel().astype(int)
        return Detection(ids, corners.reshape(-1, 2).astype(np.float64), self._obj[ids])


def write_png(spec: TargetSpec, path: Path, dpi: float = 300.0) -> Path:
    """PNG at `dpi` with the physical size recorded in its pHYs chunk (so printers keep the scale)."""
    img = spec.render(dpi / 25.4, MARGIN_MM)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    data = bytearray(buf.tobytes())
    ppm = int(round(dpi / 0.0254))
    body = b"pHYs" + ppm.to_bytes(4, "big") * 2 + b"\x01"
    chunk = (9).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    data[33:33] = chunk                       # right after IHDR (8-byte signature + 25-byte IHDR)
    path.write_bytes(bytes(data))
    return path


def write_pdf(spec: TargetSpec, path: Path, dpi: float = 300.0) -> Path:
    """One-page PDF whose page is exactly the target (plus margin) in size: print at 100 % / actual size."""
    img = spec.render(dpi / 25.4, MARGIN_MM)
    h, w = img.shape
    w_mm, h_mm = (spec.size_mm[0] + 2 * MARGIN_MM), (spec.size_mm[1] + 2 * MARGIN_MM)
    w_pt, h_pt = w_mm / 25.4 * 72.0, h_mm / 25.4 * 72.0
    pixels = zlib.compress(img.tobytes(), 9)
    content = f"q {w_pt:.4f} 0 0 {h_pt:.4f} 0 0 cm /Im0 Do Q".encode()
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        (f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w_pt:.4f} {h_pt:.4f}] "
         f"/Resources << /XObject << /Im0 4 0 R >> >> /Contents 5 0 R >>").encode(),
        (f"<< /Type /XObject /Subtype /Image /Width {w} /Height {h} /ColorSpace /DeviceGray "
         f"/BitsPerComponent 8 /Filter /FlateDecode /Length {len(pixels)} >>\nstream\n").encode()
        + pixels + b"\nendstream",
        f"<< /Length {len(content)} >>\nstream\n".encode() + content + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + o + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
    return path
