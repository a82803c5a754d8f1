"""Bit packing and 12-bit index packing: layouts, round trips, strict unpacking."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.compression import (
    CodecError,
    indices_12bit_nbytes,
    pack_bits,
    pack_indices_12bit,
    packed_nbytes,
    unpack_bits,
    unpack_indices_12bit,
)
from shoal.compression.packing import pack_bits_many, pack_indices_12bit_many

COUNTS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 1001, 65537]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("count", COUNTS)
def test_pack_bits_round_trip(bits: int, count: int) -> None:
    codes = np.random.default_rng(count).integers(0, 1 << bits, count, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert len(packed) == packed_nbytes(count, bits) == -(-count * bits // 8)
    unpacked = unpack_bits(packed, bits, count)
    assert unpacked.dtype == np.uint8 and np.array_equal(unpacked, codes)


def test_pack_bits_layout_is_lsb_first() -> None:
    assert pack_bits(np.array([1, 2, 3, 0], dtype=np.uint8), 2) == bytes([0b00_11_10_01])
    assert pack_bits(np.array([0xA, 0x5, 0x3], dtype=np.uint8), 4) == bytes([0x5A, 0x03])
    assert pack_bits(np.array([1, 0, 1], dtype=np.uint8), 1) == bytes([0b101])


def test_pack_bits_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fit"):
        pack_bits(np.array([4], dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(np.array([1, 2], dtype=np.int64), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([1], dtype=np.uint8), 3)


@pytest.mark.parametrize("bits", [2, 4])
def test_unpack_bits_is_strict(bits: int) -> None:
    packed = pack_bits(np.ones(5, dtype=np.uint8), bits)
    for data in (packed[:-1], packed + b"\0"):
        with pytest.raises(CodecError, match="need"):
            unpack_bits(data, bits, 5)
    dirty = packed[:-1] + bytes([packed[-1] | 0x80])  # sets a bit past the 5th code
    with pytest.raises(CodecError, match="padding"):
        unpack_bits(dirty, bits, 5)


@pytest.mark.parametrize("count", COUNTS)
def test_indices_12bit_round_trip(count: int) -> None:
    indices = np.random.default_rng(count).integers(0, 4096, count)
    if count >= 2:
        indices[:2] = [0, 4095]
    packed = pack_indices_12bit(indices)
    assert len(packed) == indices_12bit_nbytes(count) == -(-count * 3 // 2)
    unpacked = unpack_indices_12bit(packed, count)
    assert unpacked.dtype == np.uint16 and np.array_equal(unpacked, indices)


def test_indices_12bit_layout() -> None:
    assert pack_indices_12bit(np.array([0xABC, 0x123])) == bytes([0xBC, 0x3A, 0x12])
    assert pack_indices_12bit(np.array([0xABC])) == bytes([0xBC, 0x0A])


def test_indices_12bit_strictness() -> None:
    for bad in ([4096], [-1]):
        with pytest.raises(ValueError, match="4096"):
            pack_indices_12bit(np.array(bad))
    with pytest.raises(ValueError, match="integer"):
        pack_indices_12bit(np.array([1.0]))
    packed = pack_indices_12bit(np.array([1, 2, 3]))
    for data in (packed[:-1], packed + b"\0"):
        with pytest.raises(CodecError, match="need"):
            unpack_indices_12bit(data, 3)
    with pytest.raises(CodecError, match="padding"):
        unpack_indices_12bit(packed[:-1] + bytes([packed[-1] | 0x10]), 3)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_packing_many_segments_equals_packing_each(bits: int) -> None:
    rng = np.random.default_rng(bits)
    lengths = np.array([0, 1, 2, 3, 4, 5, 7, 8, 9, 64, 0, 333, 1])
    codes = rng.integers(0, 1 << bits, int(lengths.sum()), dtype=np.uint8)
    indices = rng.integers(0, 4096, int(lengths.sum()))
    segments = np.split(np.arange(int(lengths.sum())), np.cumsum(lengths)[:-1])
    packed_codes = pack_bits_many(codes, lengths, bits)
    packed_indices = pack_indices_12bit_many(indices, lengths)
    assert [bytes(p) for p in packed_codes] == [pack_bits(codes[s], bits) for s in segments]
    assert [bytes(p) for p in packed_indices] == [pack_indices_12bit(indices[s]) for s in segments]
