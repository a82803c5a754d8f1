"""Uniform-range quantizers decoded through per-bin means: `int8`, `q4`, `q2`.

This is the pseudo-gradient codec of INTELLECT-1's int8 DiLoCo (after hivemind's
Uniform8BitQuantization), and the value quantizer SparseLoCo (arXiv 2508.15706) applies to
its top-k values at 2 bits. Per chunk of the flattened tensor:

1. mean μ and standard deviation σ of the chunk;
2. the range [μ − rσ, μ + rσ] (r = `range_sigmas`, 6 by default) is cut into 2**bits equal
   bins; each value's code is its bin index, clamped, so outliers land in the end bins;
3. the chunk's lookup table holds, per bin, the mean of the values that fell in it (an
   empty bin gets its centre, which no code refers to).

Decoding is `table[code]`. Because each entry is the mean of its own bin, the decoded chunk
has the same sum as the original (up to float32 rounding of the table): the quantizer adds
no bias to the averaged pseudo-gradient, and outliers are absorbed into the end-bin means
instead of being clipped. A zero-variance chunk puts every value in one bin whose mean is
that value, so it round-trips exactly.

The table is sent as float32, not float16: it costs 256 x 4 bytes per 65536-element int8
chunk (1.6 % of the codes, vs 0.8 %), but float16 would overflow beyond ±65504, flush small
pseudo-gradients (|Δ| < 6e-5 are float16 subnormals) to a few significant bits, and round
away the exact bin means that make decoding unbiased.

Body layout after the shared header (`base.py`), little-endian:

    chunk size u32 | table float32[n_chunks, 2**bits] | codes packed `bits` bits each

with n_chunks = ceil(count / chunk size) (the last chunk may be short). The chunk size is
read from the payload, so peers configured with different chunk sizes still interoperate;
all lengths are checked against the element count before anything is allocated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import torch

from .base import Codec, CodecError
from .packing import pack_bits, packed_nbytes, unpack_bits

DEFAULT_CHUNK_SIZE = 65536
_CHUNK_HEADER = struct.Struct("<I")
_F32_MAX = float(np.finfo(np.float32).max)
# Work on blocks of whole chunks of about this many elements (a default int8 chunk: one per
# block), so that the several passes over each block (centre, σ, scale, clamp, cast, the two
# bincounts) run in the CPU's cache instead of streaming the tensor from memory each time.
_BLOCK_ELEMENTS = 1 << 16


def _blocks(count: int, chunk_size: int) -> Iterator[tuple[int, int, int, int]]:
    """(first chunk, number of chunks, start, stop) over the flat tensor: whole chunks in
    blocks of about _BLOCK_ELEMENTS elements (one chunk if larger), then the short tail chunk
    on its own."""
    n_full = count // chunk_size
    per_block = max(1, _BLOCK_ELEMENTS // chunk_size)
    for first in range(0, n_full, per_block):
        rows = min(per_block, n_full - first)
        yield first, rows, first * chunk_size, (first + rows) * chunk_size
    if count % chunk_size:
        yield n_full, 1, n_full * chunk_size, count


def _quantize_rows(
    rows: np.ndarray, n_bins: int, range_sigmas: float, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Codes for chunks as rows, written into `codes` (uint8, the shape of `rows`), and per
    row the mean, the bin width and the per-bin sums and counts (`_tables` makes the tables).

    σ is summed in float64 (float32 squares overflow past 1.8e19), numpy's pairwise order:
    the same bits on every machine (no BLAS, whose order depends on the CPU and threads)."""
    n_rows, width = rows.shape
    mean = rows.mean(axis=1, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        position = rows - mean.astype(np.float32)[:, None]
        squares = np.square(position, dtype=np.float64).sum(axis=1)
    sigma = np.sqrt(squares / width)
    bin_width = _codes(position, sigma, range_sigmas, n_bins, lambda g: g[:, None], codes)
    if n_rows == 1:  # one chunk: its codes are its bin keys
        keys = torch.from_numpy(codes.reshape(-1))
    else:
        keys = torch.from_numpy(codes).to(torch.int32)
        keys += (torch.arange(n_rows, dtype=torch.int32) * n_bins)[:, None]
    sums, counts = _bin_stats(keys.reshape(-1), rows.reshape(-1), n_rows * n_bins)
    return mean, bin_width, sums.reshape(n_rows, n_bins), counts.reshape(n_rows, n_bins)


def _codes(
    position: np.ndarray,
    sigma: np.ndarray,
    range_sigmas: float,
    n_bins: int,
    spread: Callable[[np.ndarray], np.ndarray],
    codes: np.ndarray,
) -> np.ndarray:
    """Bin codes of mean-centred float32 values `position` (overwritten), written into
    `codes` (uint8, same shape): 2**bits bins over ±range_sigmas·σ, outliers clamped into the
    end bins. Returns the bin width per group. `spread` maps a per-group array onto the
    elements (broadcast or repeat).

    float32 work arrays keep this fast; their precision only moves bin edges, and the table
    is computed from the codes actually assigned, so any assignment decodes consistently.
    The bin is floor(position) clamped to [0, n_bins − 1]: clamping, then truncating in the
    cast to uint8, gives the same, one pass fewer. Overflow (|x| near float32 max, or a
    scale beyond float32 for a tiny σ) gives inf/NaN positions, mapped to valid bins."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        bin_width = 2.0 * range_sigmas * sigma / n_bins
        scale = np.where(bin_width > 0, 1.0 / bin_width, 0.0).astype(np.float32)
        position *= spread(scale)  # σ = 0: every value sits at the centre bin
        position += n_bins / 2
        if np.isfinite(sigma).all() and np.isfinite(scale).all():  # every position finite
            np.clip(position, 0, n_bins - 1, out=position)
        else:  # fmax/fmin (not clip) also send NaN (0·inf) to a valid bin
            np.fmax(position, 0, out=position)
            np.fmin(position, n_bins - 1, out=position)
    np.copyto(codes, position, casting="unsafe")
    return bin_width


def _bin_stats(keys: torch.Tensor, values: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    """Per key k < size: the float64 sum of the values with that key, in element order, and
    their count (torch's bincount: several times numpy's speed on uint8 keys, same sums)."""
    weights = torch.from_numpy(values).to(torch.float64)
    sums = torch.bincount(keys, weights, minlength=size).numpy()
    return sums, torch.bincount(keys, minlength=size).numpy()


def _tables(
    sums: np.ndarray, counts: np.ndarray, mean: np.ndarray, bin_width: np.ndarray
) -> np.ndarray:
    """Per group g and bin b ([n_groups, n_bins] sums and counts), the mean of the values
    coded there; an empty bin gets its centre mean + (b + 1/2 − n_bins/2)·bin_width (no code
    refers to it)."""
    n_bins = sums.shape[1]
    with np.errstate(over="ignore", invalid="ignore"):
        centres = mean[:, None] + (np.arange(n_bins) + 0.5 - n_bins / 2) * bin_width[:, None]
        table = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
    # finite by construction for used bins (a mean of finite float32s); empty-bin centres of
    # huge-σ groups may overflow, and the receiver refuses non-finite tables
    if not np.isfinite(table).all() or np.abs(table).max(initial=0.0) > _F32_MAX:
        table = np.clip(
            np.nan_to_num(table, nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX), -_F32_MAX, _F32_MAX
        )
    return table.astype(np.float32)


def quantize_segments(
    values: np.ndarray, lengths: np.ndarray, bits: int, range_sigmas: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize consecutive segments of a flat finite float32 array, each with its own range
    and table, as `quantize_chunks` does for one chunk. For many small groups at once (the
    top-k values of every tensor of a model: one call instead of one per tensor).

    Returns (table float32 [len(lengths), 2**bits], codes uint8 [len(values)]). Every length
    must be positive and they must sum to len(values)."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    lengths = np.asarray(lengths, dtype=np.intp)
    if lengths.size and (lengths.min() < 1 or int(lengths.sum()) != values.size):
        raise ValueError("segment lengths must be positive and sum to the number of values")
    n_bins = 1 << bits
    if lengths.size == 0:
        return np.zeros((0, n_bins), dtype=np.float32), np.zeros(0, dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    segment = np.repeat(np.arange(lengths.size, dtype=np.intp), lengths)
    mean = np.add.reduceat(values.astype(np.float64), starts) / lengths
    with np.errstate(over="ignore", invalid="ignore"):
        position = values - mean.astype(np.float32)[segment]
        sigma = np.sqrt(np.add.reduceat(np.square(position, dtype=np.float64), starts) / lengths)
    codes = np.empty(values.size, dtype=np.uint8)
    bin_width = _codes(position, sigma, range_sigmas, n_bins, lambda g: g[segment], codes)
    size = lengths.size * n_bins
    sums, counts = _bin_stats(torch.from_numpy(segment * n_bins + codes), values, size)
    shape = (lengths.size, n_bins)
    return _tables(sums.reshape(shape), counts.reshape(shape), mean, bin_width), codes


def quantize_chunks(
    values: np.ndarray, bits: int, chunk_size: int, range_sigmas: float = 6.0
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a flat finite float32 array chunk by chunk.

    Returns (table float32 [n_chunks, 2**bits], codes uint8 [len(values)]). Reusable by
    composite codecs (SparseLoCo's top-k values are quantized the same way)."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    n_bins = 1 << bits
    count = values.size
    n_chunks = -(-count // chunk_size)
    mean, bin_width = np.empty(n_chunks), np.empty(n_chunks)
    sums, counts = np.empty((n_chunks, n_bins)), np.empty((n_chunks, n_bins), dtype=np.int64)
    codes = np.empty(count, dtype=np.uint8)
    for first, n_rows, start, stop in _blocks(count, chunk_size):
        rows = slice(first, first + n_rows)
        block = values[start:stop].reshape(n_rows, -1)
        mean[rows], bin_width[rows], sums[rows], counts[rows] = _quantize_rows(
            block, n_bins, range_sigmas, codes[start:stop].reshape(block.shape)
        )
    return _tables(sums, counts, mean, bin_width), codes


def dequantize_chunks(table: np.ndarray, codes: np.ndarray, chunk_size: int) -> np.ndarray:
    """Inverse of `quantize_chunks`: float32 array with element
    i = table[i // chunk_size, codes[i]].

    The caller guarantees table has ceil(len(codes) / chunk_size) rows and codes < its width."""
    n_bins = table.shape[1]
    count = codes.size
    flat_table = np.ascontiguousarray(table, dtype=np.float32).reshape(-1)
    out = np.empty(count, dtype=np.float32)
    for first, n_rows, start, stop in _blocks(count, chunk_size):
        if n_rows == 1:  # one chunk: its codes index its own table row
            row = flat_table[first * n_bins : (first + 1) * n_bins]
            np.take(row, codes[start:stop], out=out[start:stop], mode="clip")
            continue
        keys = codes[start:stop].reshape(n_rows, -1).astype(np.intp)
        keys += (np.arange(first, first + n_rows, dtype=np.intp) * n_bins)[:, None]
        # mode="clip" skips numpy's buffered bounds check; keys are in range by construction
        np.take(flat_table, keys.reshape(-1), out=out[start:stop], mode="clip")
    return out


class QuantizeCodec(Codec):
    """Chunked uniform-range quantizer with per-bin-mean lookup tables (see module doc).

    Options: `chunk_size` (elements per chunk and table; default 65536 as in INTELLECT-1)
    and `range_sigmas` (half-width of the binned range in σ; default 6)."""

    bits: ClassVar[int]

    def __init__(self, *, chunk_size: int = DEFAULT_CHUNK_SIZE, range_sigmas: float = 6.0) -> None:
        if (
            isinstance(chunk_size, bool)
            or not isinstance(chunk_size, int)
            or not 1 <= chunk_size < 2**32
        ):
            raise ValueError(
                f"{self.name}: chunk_size must be an int in [1, 2**32), got {chunk_size!r}"
            )
        if isinstance(range_sigmas, bool) or not (
            isinstance(range_sigmas, int | float)
            and math.isfinite(range_sigmas)
            and range_sigmas > 0
        ):
            raise ValueError(
                f"{self.name}: range_sigmas must be a positive finite number, got {range_sigmas!r}"
            )
        self.chunk_size = chunk_size
        self.range_sigmas = float(range_sigmas)

    def _encode_values(self, values: np.ndarray) -> list[bytes | np.ndarray]:
        table, codes = quantize_chunks(values, self.bits, self.chunk_size, self.range_sigmas)
        packed = codes if self.bits == 8 else pack_bits(codes, self.bits)  # 8 bits: as they are
        return [_CHUNK_HEADER.pack(self.chunk_size), table.astype("<f4"), packed]

    def _decode_values(self, body: memoryview, count: int) -> np.ndarray:
        if len(body) < _CHUNK_HEADER.size:
            raise CodecError(
                f"{self.name} body is {len(body)} bytes, too short for its chunk size field"
            )
        (chunk_size,) = _CHUNK_HEADER.unpack_from(body)
        if chunk_size == 0:
            raise CodecError(f"{self.name} payload declares chunk size 0")
        n_bins = 1 << self.bits
        n_chunks = -(-count // chunk_size)
        table_nbytes = n_chunks * n_bins * 4
        expected = _CHUNK_HEADER.size + table_nbytes + packed_nbytes(count, self.bits)
        if len(body) != expected:
            raise CodecError(
                f"{self.name} body is {len(body)} bytes; {count} elements in chunks of "
                f"{chunk_size} need {expected}"
            )
        table = np.frombuffer(body, dtype="<f4", count=n_chunks * n_bins, offset=_CHUNK_HEADER.size)
        finite = np.isfinite(table)
        if not finite.all():
            raise CodecError(
                f"{self.name} lookup table holds {int(finite.size - finite.sum())} "
                "non-finite entries"
            )
        codes = unpack_bits(body[_CHUNK_HEADER.size + table_nbytes :], self.bits, count)
        return dequantize_chunks(table.reshape(n_chunks, n_bins), codes, chunk_size)

    def _body_nbytes(self, count: int) -> int:
        n_chunks = -(-count // self.chunk_size)
        return _CHUNK_HEADER.size + n_chunks * (4 << self.bits) + packed_nbytes(count, self.bits)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(chunk_size={self.chunk_size}, "
            f"range_sigmas={self.range_sigmas:g})"
        )


class Int8Codec(QuantizeCodec):
    """8-bit codes, 256 bins: INTELLECT-1's int8 DiLoCo codec, the swarm's default
    (~3.9x < fp32)."""

    name = "int8"
    codec_id = 3
    bits = 8


class Q4Codec(QuantizeCodec):
    """4-bit codes, two per byte: Streaming DiLoCo's outer-gradient precision (~7.9x < fp32)."""

    name = "q4"
    codec_id = 4
    bits = 4


class Q2Codec(QuantizeCodec):
    """2-bit codes, four per byte: SparseLoCo's value precision (~15.9x < fp32)."""

    name = "q2"
    codec_id = 5
    bits = 2
