"""Fuzzing decode with corrupted payloads: it must raise CodecError (never another
exception type) and never return a wrong tensor silently.

Two layers are tested. Random corruption (flips, truncation, garbage) is caught by the CRC,
so it must always raise CodecError. A malicious peer can recompute the CRC ("resealed"
payloads below), so the structural checks are tested on their own too: header, length,
padding and non-finite table corruption must still raise CodecError; changed table or code
values may legitimately decode, but only to a finite tensor of the expected shape.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from shoal.compression import CODECS, CodecError, get_codec
from shoal.compression.base import HEADER, MAGIC

SHAPE = (5, 611)  # 3055 elements: with chunk_size=1024, two whole chunks and a ragged tail
CRC_AT = HEADER.size - 4


def make_codec(name: str):
    return get_codec(name, chunk_size=1024) if name in ("int8", "q4", "q2") else get_codec(name)


def encoded(name: str, seed: int = 0) -> bytes:
    tensor = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return make_codec(name).encode(tensor)


def reseal(payload: bytes | bytearray) -> bytes:
    """Recompute the CRC, as a peer that means harm would."""
    data = bytearray(payload)
    if len(data) >= HEADER.size:
        crc = zlib.crc32(bytes(data[HEADER.size :]), zlib.crc32(bytes(data[:CRC_AT])))
        data[CRC_AT : HEADER.size] = struct.pack("<I", crc)
    return bytes(data)


def table_span(name: str, payload: bytes) -> tuple[int, int]:
    """[start, stop) byte offsets of the lookup table in a quantizer payload (empty otherwise)."""
    if name not in ("int8", "q4", "q2"):
        return HEADER.size, HEADER.size
    start = HEADER.size + 4
    bits = {"int8": 8, "q4": 4, "q2": 2}[name]
    n_chunks = -(-int(np.prod(SHAPE)) // 1024)
    return start, start + n_chunks * (4 << bits)


def decode_or_codec_error(codec, payload: bytes, shape=SHAPE) -> torch.Tensor | None:
    """Decode; CodecError -> None; anything else fails the test. A returned tensor must be
    float32, finite and exactly `shape`."""
    try:
        tensor = codec.decode(payload, shape)
    except CodecError:
        return None
    assert tensor.dtype == torch.float32 and tensor.shape == torch.Size(shape)
    assert torch.isfinite(tensor).all()
    return tensor


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_single_byte_flip_is_caught(name: str) -> None:
    codec, payload = make_codec(name), encoded(name)
    rng = np.random.default_rng(0)
    offsets = set(range(min(len(payload), 2 * HEADER.size + 64)))  # whole header + body start
    offsets |= set(rng.integers(0, len(payload), 400).tolist())
    for offset in sorted(offsets):
        corrupt = bytearray(payload)
        corrupt[offset] ^= int(rng.integers(1, 256))
        with pytest.raises(CodecError):
            codec.decode(bytes(corrupt), SHAPE)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_truncation_and_trailing_bytes(name: str) -> None:
    codec, payload = make_codec(name), encoded(name)
    cuts = list(range(0, HEADER.size + 8)) + list(range(HEADER.size + 8, len(payload), 37))
    for cut in cuts:
        for candidate in (payload[:cut], reseal(payload[:cut])):
            with pytest.raises(CodecError):
                codec.decode(candidate, SHAPE)
    for extra in (b"\0", b"\0" * 4, b"garbage" * 50):
        for candidate in (payload + extra, reseal(payload + extra)):
            with pytest.raises(CodecError, match="CRC|bytes"):
                codec.decode(candidate, SHAPE)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_resealed_header_corruption_is_caught(name: str) -> None:
    codec, payload = make_codec(name), encoded(name)
    for offset in range(CRC_AT):  # magic, codec id, version, element count
        for flip in (0x01, 0x80, 0xFF):
            corrupt = bytearray(payload)
            corrupt[offset] ^= flip
            with pytest.raises(CodecError):
                codec.decode(reseal(corrupt), SHAPE)


def test_quantizer_chunk_size_field() -> None:
    codec, payload = make_codec("int8"), encoded("int8")
    zero = bytearray(payload)
    zero[HEADER.size : HEADER.size + 4] = bytes(4)
    with pytest.raises(CodecError, match="chunk size 0"):
        codec.decode(reseal(zero), SHAPE)
    # a different chunk size changes the table count, so the length no longer adds up
    other = bytearray(payload)
    other[HEADER.size : HEADER.size + 4] = struct.pack("<I", 512)
    with pytest.raises(CodecError, match="need"):
        codec.decode(reseal(other), SHAPE)


@pytest.mark.parametrize("name", ["int8", "q4", "q2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_resealed_non_finite_table_entry_is_caught(name: str, bad: float) -> None:
    codec, payload = make_codec(name), encoded(name)
    start, stop = table_span(name, payload)
    for entry in (start, (start + stop) // 2 // 4 * 4 + start % 4, stop - 4):
        corrupt = bytearray(payload)
        corrupt[entry : entry + 4] = struct.pack("<f", bad)
        with pytest.raises(CodecError, match="non-finite"):
            codec.decode(reseal(corrupt), SHAPE)


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_resealed_non_finite_dense_value_is_caught(name: str) -> None:
    codec, payload = make_codec(name), encoded(name)
    corrupt = bytearray(payload)
    if name == "fp32":
        corrupt[HEADER.size + 40 : HEADER.size + 44] = struct.pack("<f", float("nan"))
    else:
        corrupt[HEADER.size + 40 : HEADER.size + 42] = struct.pack("<e", float("inf"))
    with pytest.raises(CodecError, match="non-finite"):
        codec.decode(reseal(corrupt), SHAPE)


@pytest.mark.parametrize("name", ["q4", "q2"])
def test_resealed_padding_bits_are_caught(name: str) -> None:
    codec = make_codec(name)
    odd = torch.randn(1025)  # 1025 codes leave padding bits in the last byte for 4 and 2 bits
    payload = bytearray(codec.encode(odd))
    payload[-1] |= 0x80
    with pytest.raises(CodecError, match="padding"):
        codec.decode(reseal(payload), (1025,))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_resealed_body_flips_decode_finite_or_raise(name: str) -> None:
    """Table and code bytes rewritten by a peer: a different tensor is possible (the peer
    could have sent it honestly), but never a non-finite one, a wrong shape, or a crash."""
    codec, payload = make_codec(name), encoded(name)
    rng = np.random.default_rng(1)
    body_start = HEADER.size + (4 if name in ("int8", "q4", "q2") else 0)
    for offset in rng.integers(body_start, len(payload), 300):
        corrupt = bytearray(payload)
        corrupt[offset] ^= int(rng.integers(1, 256))
        decode_or_codec_error(codec, reseal(corrupt))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_random_garbage(name: str) -> None:
    codec = make_codec(name)
    rng = np.random.default_rng(2)
    codec_id = CODECS[name].codec_id
    count = int(np.prod(SHAPE))
    for length in [0, 1, 5, HEADER.size - 1, HEADER.size, *rng.integers(0, 30_000, 60).tolist()]:
        garbage = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        with pytest.raises(CodecError):
            codec.decode(garbage, SHAPE)
        # garbage behind a valid, resealed header: only a body of exactly the right length
        # can get past the length checks, and then it must still decode to finite values
        if length >= HEADER.size:
            forged = HEADER.pack(MAGIC, codec_id, 1, count, 0) + garbage[HEADER.size :]
            decode_or_codec_error(codec, reseal(forged))
    exact = (
        HEADER.pack(MAGIC, codec_id, 1, count, 0)
        + rng.integers(0, 256, codec.payload_nbytes(count) - HEADER.size, dtype=np.uint8).tobytes()
    )
    decode_or_codec_error(codec, reseal(exact))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_wrong_expected_shape(name: str) -> None:
    codec, payload = make_codec(name), encoded(name)
    for shape in [(5, 610), (5, 612), (3055 + 1,), (0,), (), (2**40,), (611, 5, 2)]:
        with pytest.raises(CodecError, match="elements"):
            codec.decode(payload, shape)
    # the header holds a count, not a shape: a same-size reshape is the receiver's call
    assert codec.decode(payload, (611, 5)).shape == (611, 5)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_lying_element_count_allocates_nothing(name: str) -> None:
    """A header claiming 2**40 elements, decoded by a receiver that expects that many: the
    length check must refuse it from arithmetic alone (no 4 TB allocation)."""
    codec = make_codec(name)
    huge = 2**40
    forged = HEADER.pack(MAGIC, CODECS[name].codec_id, 1, huge, 0)
    if name in ("int8", "q4", "q2"):
        forged += struct.pack("<I", 1)  # chunk size 1: a table per element
    forged += bytes(1000)
    with pytest.raises(CodecError, match="need"):
        codec.decode(reseal(forged), (huge,))


@pytest.mark.parametrize("source", sorted(CODECS))
@pytest.mark.parametrize("target", sorted(CODECS))
def test_cross_codec_payloads_refused(source: str, target: str) -> None:
    if source == target:
        return
    with pytest.raises(CodecError, match=f"encoded by '{source}'"):
        make_codec(target).decode(encoded(source), SHAPE)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_not_bytes_refused(name: str) -> None:
    codec = make_codec(name)
    for payload in (None, "text", [1, 2, 3], 12):
        with pytest.raises(CodecError, match="bytes"):
            codec.decode(payload, SHAPE)  # type: ignore[arg-type]
    assert codec.decode(bytearray(encoded(name)), SHAPE).shape == SHAPE
    assert codec.decode(memoryview(encoded(name)), SHAPE).shape == SHAPE
    strided = np.frombuffer(encoded(name) * 2, dtype=np.uint8)[::2]
    with pytest.raises(CodecError, match="contiguous"):
        codec.decode(memoryview(strided), SHAPE)


def test_unknown_version_refused() -> None:
    codec, payload = make_codec("int8"), bytearray(encoded("int8"))
    payload[2] = 2
    with pytest.raises(CodecError, match="version 2"):
        codec.decode(reseal(payload), SHAPE)
