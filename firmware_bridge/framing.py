"""COBS framing with CRC-16 for the diverter link (PROTOCOL.md §2).

Why COBS: it leaves exactly one reserved byte (0x00) as the frame delimiter, so a receiver that lost sync
(line noise, a host that opened the port mid-frame) recovers at the next 0x00 without any timeouts. The
CRC catches what COBS cannot.

The decoder follows the pymodbus framer contract: ``decode(buffer) -> (used, frame)``; ``used == 0`` means
"need more bytes"; ``used > 0`` with ``frame is None`` means the bytes were garbage and are consumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

DELIMITER = 0x00
HEADER_LEN = 4  # version, seq, msg_type, payload_len
CRC_LEN = 2
MAX_PAYLOAD = 255
MIN_BODY = HEADER_LEN + CRC_LEN
MAX_BODY = HEADER_LEN + MAX_PAYLOAD + CRC_LEN  # 261
#: Longest COBS encoding of a body: one overhead byte per started 254-byte block.
MAX_ENCODED = MAX_BODY + (MAX_BODY + 253) // 254  # 263


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc16_ccitt_false(data: bytes | bytearray | memoryview, crc: int = 0xFFFF) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection); check("123456789") == 0x29B1."""
    table = _CRC_TABLE
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ b) & 0xFF]
    return crc


class FramingError(ValueError):
    """A frame could not be built (payload too long, field out of range)."""


def cobs_encode(data: bytes | bytearray) -> bytes:
    """Encode ``data`` so that the result contains no 0x00 byte."""
    out = bytearray()
    code_index = 0
    out.append(0)  # placeholder for the first code byte
    code = 1
    for b in data:
        if b == 0:
            out[code_index] = code
            code_index = len(out)
            out.append(0)
            code = 1
            continue
        out.append(b)
        code += 1
        if code == 0xFF:
            out[code_index] = code
            code_index = len(out)
            out.append(0)
            code = 1
    out[code_index] = code
    return bytes(out)


def cobs_decode(data: bytes | bytearray | memoryview) -> bytes:
    """Inverse of :func:`cobs_encode`; raises ``ValueError`` on malformed input."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ValueError("COBS: zero byte inside a frame")
        end = i + code
        if end > n:
            raise ValueError(f"COBS: code byte {code} at {i} runs past the end ({n} bytes)")
        out += data[i + 1 : end]
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


@dataclass(frozen=True)
class Frame:
    """One validated frame: header fields plus the raw payload (message decoding is a separate layer)."""

    version: int
    seq: int
    msg_type: int
    payload: bytes = b""


def frame_body(frame: Frame) -> bytes:
    """The body before COBS: header | payload | CRC16 little-endian."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise FramingError(
            f"payload of {len(frame.payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit "
            f"(msg_type 0x{frame.msg_type:02x}); split the message or shorten it"
        )
    for name in ("version", "seq", "msg_type"):
        value = getattr(frame, name)
        if not 0 <= value <= 0xFF:
            raise FramingError(f"frame field {name}={value} does not fit in one byte (0..255)")
    body = bytes((frame.version, frame.seq, frame.msg_type, len(frame.payload))) + bytes(frame.payload)
    return body + crc16_ccitt_false(body).to_bytes(2, "little")


def encode_frame(frame: Frame) -> bytes:
    """Wire bytes for ``frame``: ``00 <cobs(body)> 00`` (the leading 00 ends any preceding line noise)."""
    return b"\x00" + cobs_encode(frame_body(frame)) + b"\x00"


@dataclass
class DecodeStats:
    """Why bytes were thrown away; a rising count points at cabling, baud rate or a protocol mismatch."""

    frames_ok: int = 0
    crc_errors: int = 0
    malformed: int = 0  # bad COBS, bad length, payload_len mismatch
    resyncs: int = 0  # times the decoder threw bytes away and restarted at a delimiter
    bytes_discarded: int = 0


def decode(buffer: bytes | bytearray, stats: DecodeStats | None = None) -> tuple[int, Frame | None]:
    """Decode at most one frame from the start of ``buffer``.

    Returns ``(used, frame)``: ``(0, None)`` = need more bytes; ``(n, None)`` = n bytes consumed without a
    frame (an empty chunk between delimiters, or garbage, which is counted in ``stats``); ``(n, frame)``.
    Callers loop until ``used == 0``.
    """
    end = buffer.find(DELIMITER)
    if end < 0:
        if len(buffer) > MAX_ENCODED:
            # No frame can be this long without a delimiter: all of it is garbage.
            if stats is not None:
                stats.resyncs += 1
                stats.bytes_discarded += len(buffer)
            return len(buffer), None
        return 0, None
    used = end + 1
    if end == 0:
        return used, None  # empty chunk: a leading/trailing delimiter
    chunk = buffer[:end]
    frame, error = _parse_chunk(chunk)
    if frame is None:
        if stats is not None:
            stats.resyncs += 1
            stats.bytes_discarded += used
            if error == "crc":
                stats.crc_errors += 1
            else:
                stats.malformed += 1
        return used, None
    if stats is not None:
        stats.frames_ok += 1
    return used, frame


def _parse_chunk(chunk: bytes | bytearray) -> tuple[Frame | None, str]:
    if len(chunk) > MAX_ENCODED:
        return None, "length"
    try:
        body = cobs_decode(chunk)
    except ValueError:
        return None, "cobs"
    if not MIN_BODY <= len(body) <= MAX_BODY:
        return None, "length"
    if body[3] != len(body) - MIN_BODY:
        return None, "length"
    if crc16_ccitt_false(body[:-2]) != int.from_bytes(body[-2:], "little"):
        return None, "crc"
    return Frame(version=body[0], seq=body[1], msg_type=body[2], payload=bytes(body[4:-2])), ""


@dataclass
class FrameDecoder:
    """Stateful stream decoder: feed it whatever the port returned, get whole frames back."""

    stats: DecodeStats = field(default_factory=DecodeStats)
    _buffer: bytearray = field(default_factory=bytearray, repr=False)

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        consumed = 0
        view = self._buffer
        while True:
            # decode() works on a slice so that find() starts at the right place.
            used, frame = decode(view[consumed:] if consumed else view, self.stats)
            if used == 0:
                break
            consumed += used
            if frame is not None:
                frames.append(frame)
        if consumed:
            del self._buffer[:consumed]
        return frames

    def reset(self) -> None:
        """Forget any partial frame (e.g. after a port re-open)."""
        self._buffer.clear()

    @property
    def frames_ok(self) -> int:
        return self.stats.frames_ok

    @property
    def crc_errors(self) -> int:
        return self.stats.crc_errors

    @property
    def resyncs(self) -> int:
        return self.stats.resyncs

    @property
    def bytes_discarded(self) -> int:
        return self.stats.bytes_discarded

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)
