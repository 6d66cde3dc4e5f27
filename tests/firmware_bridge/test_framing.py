"""Framing layer: every frame whole, split, byte by byte, wrapped in garbage, and corrupted."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from firmware_bridge.framing import (
    MAX_ENCODED,
    Frame,
    FrameDecoder,
    FramingError,
    cobs_decode,
    cobs_encode,
    crc16_ccitt_false,
    decode,
    encode_frame,
)

FRAMES = [
    Frame(1, 0, 0x05, b""),
    Frame(1, 1, 0x02, b"\x00"),
    Frame(1, 2, 0x02, bytes(range(1, 20))),
    Frame(1, 255, 0x84, b"\x00" * 16),
    Frame(1, 7, 0x01, bytes((i * 37 + 1) & 0xFF or 1 for i in range(253))),  # no zeros, crosses 254
    Frame(1, 8, 0x01, bytes(i & 0xFF for i in range(255))),  # maximum payload
]
IDS = [f"len{len(f.payload)}-seq{f.seq}" for f in FRAMES]


def test_crc_check_value() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1


@given(st.binary(max_size=600))
def test_cobs_round_trip_and_no_zero(data: bytes) -> None:
    enc = cobs_encode(data)
    assert 0 not in enc
    assert cobs_decode(enc) == data


def test_cobs_rejects_overrun() -> None:
    with pytest.raises(ValueError):
        cobs_decode(b"\x05ab")


@pytest.mark.parametrize("frame", FRAMES, ids=IDS)
def test_whole_frame(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert len(wire) <= MAX_ENCODED + 2
    dec = FrameDecoder()
    assert dec.feed(wire) == [frame]
    assert (dec.frames_ok, dec.crc_errors, dec.resyncs, dec.bytes_discarded) == (1, 0, 0, 0)


@pytest.mark.parametrize("frame", FRAMES, ids=IDS)
def test_split_in_two_at_every_position(frame: Frame) -> None:
    wire = encode_frame(frame)
    for cut in range(len(wire) + 1):
        dec = FrameDecoder()
        got = dec.feed(wire[:cut]) + dec.feed(wire[cut:])
        assert got == [frame], f"cut at {cut}"
        assert dec.resyncs == 0 and dec.pending_bytes == 0


@pytest.mark.parametrize("frame", FRAMES, ids=IDS)
def test_byte_by_byte(frame: Frame) -> None:
    dec = FrameDecoder()
    got: list[Frame] = []
    for b in encode_frame(frame):
        got += dec.feed(bytes([b]))
    assert got == [frame]


def test_many_frames_in_one_read() -> None:
    wire = b"".join(encode_frame(f) for f in FRAMES)
    assert FrameDecoder().feed(wire) == FRAMES


@pytest.mark.parametrize("garbage", [b"\x13\x37\xff", b"\x00\x01\x02\x00\xaa", bytes(range(1, 256)) * 2])
def test_garbage_before_and_after(garbage: bytes) -> None:
    good = FRAMES[2]
    dec = FrameDecoder()
    got = dec.feed(garbage + encode_frame(good) + garbage + encode_frame(FRAMES[3]) + garbage)
    assert got == [good, FRAMES[3]]
    assert dec.frames_ok == 2
    assert dec.bytes_discarded > 0 and dec.resyncs >= 1


@pytest.mark.parametrize("frame", FRAMES[:4], ids=IDS[:4])
def test_every_single_bit_flip_is_rejected_and_next_frame_survives(frame: Frame) -> None:
    wire = encode_frame(frame)
    follower = FRAMES[2]
    for i in range(len(wire)):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            dec = FrameDecoder()
            got = dec.feed(bytes(bad) + encode_frame(follower))
            assert got == [follower], f"byte {i} bit {bit}"
            assert dec.crc_errors + dec.stats.malformed >= 1


def test_bad_crc_counted_as_crc_error() -> None:
    from firmware_bridge.framing import frame_body

    body = bytearray(frame_body(FRAMES[2]))
    body[-1] ^= 0xFF
    dec = FrameDecoder()
    assert dec.feed(b"\x00" + cobs_encode(bytes(body)) + b"\x00") == []
    assert dec.crc_errors == 1 and dec.resyncs == 1


def test_decode_contract() -> None:
    wire = encode_frame(FRAMES[2])
    assert decode(wire[1:5]) == (0, None)  # no delimiter yet: need more
    assert decode(wire) == (1, None)  # leading delimiter: empty chunk consumed
    used, frame = decode(wire[1:])
    assert (used, frame) == (len(wire) - 1, FRAMES[2])


def test_endless_garbage_without_delimiter_is_dropped() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"\x55" * (MAX_ENCODED + 10)) == []
    assert dec.pending_bytes == 0 and dec.bytes_discarded == MAX_ENCODED + 10
    assert dec.feed(encode_frame(FRAMES[0])) == [FRAMES[0]]


def test_payload_too_long_is_refused() -> None:
    with pytest.raises(FramingError, match="255-byte limit"):
        encode_frame(Frame(1, 0, 1, b"x" * 256))
