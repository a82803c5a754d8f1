"""zstd framing: compress only when it helps, refuse bombs and malformed frames."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard

from shoal.compression import CodecError, FrameTooLarge, zstd_frame, zstd_unframe

MB = 1 << 20


def test_round_trip_compressible() -> None:
    data = b"pseudo-gradient " * 10_000
    framed = zstd_frame(data)
    assert framed[0] == 1 and len(framed) < len(data) // 10
    assert zstd_unframe(framed, max_size=len(data)) == data


def test_incompressible_and_small_data_stored() -> None:
    noise = os.urandom(100_000)
    framed = zstd_frame(noise)
    assert framed == b"\x00" + noise  # exactly one byte of overhead
    assert zstd_unframe(framed, max_size=len(noise)) == noise
    small = b"a" * 1000  # compressible, but below min_size
    assert zstd_frame(small) == b"\x00" + small
    assert zstd_frame(small, min_size=100)[0] == 1
    assert zstd_unframe(zstd_frame(b""), max_size=0) == b""


def test_accepts_any_bytes_like() -> None:
    data = bytearray(b"x" * 5000)
    framed = zstd_frame(memoryview(data), level=1)
    assert zstd_unframe(bytearray(framed), max_size=5000) == data


def test_zip_bomb_refused() -> None:
    bomb = zstd_frame(bytes(64 * MB))  # 64 MiB of zeros: a few KB on the wire
    assert len(bomb) < 10_000
    with pytest.raises(FrameTooLarge, match="limit") as caught:
        zstd_unframe(bomb, max_size=MB)
    assert caught.value.size == 64 * MB and caught.value.limit == MB
    assert isinstance(caught.value, CodecError)


def test_lying_content_size_refused() -> None:
    """A header that declares little but decompresses to more: zstd stops at the declared
    size, so memory stays bounded by what the receiver accepted."""
    honest = zstandard.ZstdCompressor().compress(bytes(100_000))
    assert honest[4] & 0xC0 == 0x80  # frame header: 4-byte content size field follows
    offset = 5 if honest[4] & 0x20 else 6  # single-segment frames have no window byte
    lying = bytearray(honest)
    lying[offset : offset + 4] = (1000).to_bytes(4, "little")
    with pytest.raises(CodecError):
        zstd_unframe(b"\x01" + bytes(lying), max_size=MB)


def test_undeclared_size_refused() -> None:
    hidden = b"\x01" + zstandard.ZstdCompressor(write_content_size=False).compress(bytes(8 * MB))
    with pytest.raises(CodecError, match="declare"):
        zstd_unframe(hidden, max_size=16 * MB)


def test_stored_frame_over_limit_refused() -> None:
    with pytest.raises(FrameTooLarge, match="limit"):
        zstd_unframe(b"\x00" + bytes(101), max_size=100)
    assert zstd_unframe(b"\x00" + bytes(100), max_size=100) == bytes(100)


def test_malformed_frames_refused() -> None:
    data = np.random.default_rng(0).integers(0, 4, 50_000, dtype=np.uint8).tobytes()
    framed = zstd_frame(data)
    assert framed[0] == 1
    bad_frames = [
        b"",
        b"\x02" + data,  # unknown flag
        b"\x01",
        b"\x01" + os.urandom(1000),  # garbage where a zstd frame should be
        framed + b"\x00",  # trailing bytes
        framed + framed[1:],  # a second frame
    ]
    bad_frames += [framed[:cut] for cut in range(1, len(framed), max(1, len(framed) // 40))]
    for bad in bad_frames:
        with pytest.raises(CodecError):
            zstd_unframe(bad, max_size=10 * MB)
    with pytest.raises(CodecError, match="bytes"):
        zstd_unframe("not bytes", max_size=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_size"):
        zstd_unframe(framed, max_size=-1)


def test_corrupted_compressed_frames_raise_codec_error() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 8, 20_000, dtype=np.uint8).tobytes()
    framed = bytearray(zstd_frame(data))
    for _ in range(300):
        corrupt = bytearray(framed)
        corrupt[rng.integers(1, len(corrupt))] ^= int(rng.integers(1, 256))
        try:
            out = zstd_unframe(bytes(corrupt), max_size=len(data))
        except CodecError:
            continue
        assert out == data  # the frame's content checksum: a flip may be harmless, never silent


@pytest.mark.parametrize(
    "parts",
    [
        [b"a" * 100_000, b"\x00\x01" * 3000, b"b" * 300_000],
        [bytes(range(256)) * 8],
        [b"x" * 10],
        [],
    ],
)
def test_framing_parts_frames_their_concatenation(parts):
    from shoal.compression import zstd_frame_parts

    joined = b"".join(parts)
    framed = zstd_frame_parts([memoryview(p) for p in parts], min_size=1024, step_bytes=4096)
    one_shot = zstd_frame(joined, min_size=1024)
    assert framed[0] == one_shot[0]  # compressed (or stored) alike
    assert abs(len(framed) - len(one_shot)) <= max(16, len(one_shot) // 100)
    assert zstd_unframe(framed, max_size=len(joined)) == joined
