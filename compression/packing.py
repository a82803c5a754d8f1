"""Bit packing for quantizer codes and top-k indices.

Sub-byte codes only save bandwidth if they are packed: SparseLoCo (arXiv 2508.15706) sends
2-bit values four to a byte and chunk-local indices (< 4096) in 12 bits, two to three
bytes; Streaming DiLoCo's 4-bit outer gradients go two to a byte.

Layouts (fixed; both ends of the wire depend on them):
* `pack_bits`: element j of each group goes to bits [bits*j, bits*(j+1)) of its byte,
  least significant first; the last byte is zero-padded.
* `pack_indices_12bit`: indices a, b become bytes (a & 0xFF), (a >> 8) | (b & 0xF) << 4,
  b >> 4; an odd count ends with 2 bytes (a's 12 bits and 4 zero bits).
Unpacking checks the exact length and that padding bits are zero, raising CodecError, so a
packed field cannot hide extra data or claim a different count.
"""

from __future__ import annotations

import numpy as np

from .base import CodecError

_VALID_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in _VALID_BITS:
        raise ValueError(f"bits must be one of {_VALID_BITS}, got {bits!r}")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes `pack_bits` produces for `count` codes of `bits` bits."""
    _check_bits(bits)
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int, *, checked: bool = True) -> bytes:
    """Pack a 1-D uint8 array of codes < 2**bits into bytes, 8 // bits codes per byte.
    `checked=False` skips the range check, for callers whose codes are in range by
    construction (a quantizer's output)."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 1:
        raise ValueError(f"codes must be a 1-D uint8 array, got {codes.dtype}{codes.shape}")
    if bits == 8:
        return codes.tobytes()
    if checked and codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    per_byte = 8 // bits
    pad = -codes.size % per_byte
    if pad:
        codes = np.concatenate((codes, np.zeros(pad, dtype=np.uint8)))
    groups = codes.reshape(-1, per_byte)
    packed = groups[:, 0].copy()
    for j in range(1, per_byte):
        packed |= groups[:, j] << (bits * j)
    return packed.tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: a new uint8 array of `count` codes.

    Raises CodecError if `data` is not exactly `packed_nbytes(count, bits)` long or its
    padding bits are not zero."""
    expected = packed_nbytes(count, bits)
    if len(data) != expected:
        raise CodecError(f"{count} {bits}-bit codes need {expected} bytes, got {len(data)}")
    packed = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return packed.copy()
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    codes = np.empty((packed.size, per_byte), dtype=np.uint8)
    for j in range(per_byte):
        np.bitwise_and(packed >> (bits * j), mask, out=codes[:, j])
    codes = codes.reshape(-1)
    if codes[count:].any():
        raise CodecError(f"padding bits after the last {bits}-bit code are not zero")
    return codes[:count]


def indices_12bit_nbytes(count: int) -> int:
    """Bytes `pack_indices_12bit` produces for `count` indices (12 bits each, rounded up)."""
    return (count * 12 + 7) // 8


def pack_indices_12bit(indices: np.ndarray, *, checked: bool = True) -> bytes:
    """Pack a 1-D array of integer indices in [0, 4096) into 12 bits each (`checked=False`:
    the caller guarantees the range)."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype}{indices.shape}")
    if checked and indices.size and (int(indices.min()) < 0 or int(indices.max()) >= 4096):
        raise ValueError("12-bit indices must lie in [0, 4096)")
    count = indices.size
    padded = np.zeros(count + count % 2, dtype=np.uint16)
    padded[:count] = indices
    first, second = padded[0::2], padded[1::2]
    triples = np.empty((first.size, 3), dtype=np.uint8)
    triples[:, 0] = first & 0xFF
    triples[:, 1] = (first >> 8) | ((second & 0xF) << 4)
    triples[:, 2] = second >> 4
    return triples.tobytes()[: indices_12bit_nbytes(count)]


def unpack_indices_12bit(data: bytes, count: int) -> np.ndarray:
    """Inverse of `pack_indices_12bit`: a uint16 array of `count` indices in [0, 4096).

    Raises CodecError on a wrong length or non-zero padding bits (odd counts)."""
    expected = indices_12bit_nbytes(count)
    if len(data) != expected:
        raise CodecError(f"{count} 12-bit indices need {expected} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if count % 2:
        raw = np.concatenate((raw, np.zeros(1, dtype=np.uint8)))
    triples = raw.reshape(-1, 3).astype(np.uint16)
    indices = np.empty(triples.shape[0] * 2, dtype=np.uint16)
    indices[0::2] = triples[:, 0] | ((triples[:, 1] & 0xF) << 8)
    indices[1::2] = (triples[:, 1] >> 4) | (triples[:, 2] << 4)
    if count % 2 and indices[-1]:
        raise CodecError("padding bits after the last 12-bit index are not zero")
    return indices[:count]


def segment_slots(lengths: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """Where element i of the concatenated segments goes once every segment s is padded
    from lengths[s] to padded[s] elements (segments kept in order)."""
    shift = (np.cumsum(padded) - padded) - (np.cumsum(lengths) - lengths)
    return np.arange(int(lengths.sum()), dtype=np.intp) + np.repeat(shift, lengths)


def _split(data: bytes, starts: np.ndarray, stops: np.ndarray) -> list[memoryview]:
    view = memoryview(data)
    return [view[start:stop] for start, stop in zip(starts.tolist(), stops.tolist(), strict=True)]


def pack_bits_many(codes: np.ndarray, lengths: np.ndarray, bits: int) -> list[memoryview]:
    """`pack_bits` of each consecutive segment of `codes` (segment s has lengths[s]
    codes, all in range by construction), in one pass over all of them: each segment is
    zero-padded to whole bytes, packed together, and returned as a view of its bytes."""
    _check_bits(bits)
    lengths = np.asarray(lengths, dtype=np.intp)
    nbytes = (lengths * bits + 7) // 8
    stops = np.cumsum(nbytes)
    padded = nbytes * (8 // bits)
    if bits != 8 and (padded != lengths).any():
        buffer = np.zeros(int(padded.sum()), dtype=np.uint8)
        buffer[segment_slots(lengths, padded)] = codes
        codes = buffer
    return _split(pack_bits(codes, bits, checked=False), stops - nbytes, stops)


def pack_indices_12bit_many(indices: np.ndarray, lengths: np.ndarray) -> list[memoryview]:
    """`pack_indices_12bit` of each consecutive segment of `indices` (all in [0, 4096) by
    construction), in one pass: each segment is padded to an even count, packed together,
    and returned as a view of its bytes (an odd segment drops its trailing zero byte)."""
    lengths = np.asarray(lengths, dtype=np.intp)
    padded = lengths + lengths % 2
    if (padded != lengths).any():
        buffer = np.zeros(int(padded.sum()), dtype=np.uint16)
        buffer[segment_slots(lengths, padded)] = indices
        indices = buffer
    starts = np.cumsum(padded * 3 // 2) - padded * 3 // 2
    return _split(
        pack_indices_12bit(indices, checked=False), starts, starts + (lengths * 12 + 7) // 8
    )
