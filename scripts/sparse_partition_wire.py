"""Byte accounting for `bench_sparse_partition.py`: what a sparse (`topk`) round costs per
peer when contributions are gathered whole, or partitioned by chunk ranges and reduced.

Coordinates. A model's `topk` chunks (compression/topk_layout.py), tensor after tensor in
name order, laid end to end: element `pos` of global chunk c has the chunk-major coordinate
`chunk_start[c] + pos`, with `pos` the codec's own in-chunk position (row-major inside a
ragged tile). A chunk range is then a coordinate range, which is what an owner holds.

Three messages are costed from real bytes:
* a contribution: the `topk` payloads as SparseLoCo sends them (measured by the caller);
* a piece, one participant's contribution restricted to an owner's chunk range: per tensor
  it overlaps, the codec's header, geometry and the tensor's value table (needed for
  bit-exact values) plus the 2-bit codes and 12-bit positions of the range's chunks
  (`piece_nbytes`; over the whole model it equals the contribution's length);
* an aggregated shard, the exact SparseLoCo aggregate over a range (`encode_shard` /
  `decode_shard`): per chunk the cheapest of a 12-bit position list, a bitmap, or dense,
  then every value at `value_bytes` (4: float32, exact; 2: bfloat16, lossy).
"""

from __future__ import annotations

import statistics
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.compression import TopKCodec, chunk_layout
from shoal.compression.base import HEADER
from shoal.compression.packing import (
    indices_12bit_nbytes,
    pack_bits,
    pack_indices_12bit,
    packed_nbytes,
    unpack_bits,
    unpack_indices_12bit,
)

SHARD_HEADER = struct.Struct("<BBBIII")  # magic, version, value bytes, first chunk, end, crc32
SHARD_MAGIC = 0x5D
LIST, BITMAP, DENSE, EMPTY = 0, 1, 2, 3  # a chunk's mode in an aggregated shard
VALUE_DTYPES = {4: np.dtype("<f4"), 2: np.dtype("<u2")}  # 2: bfloat16 bits


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even), as uint16 bits; float32's range, so a
    pseudo-gradient of any scale keeps ~3 significant digits (float16 would flush 1e-6)."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4").astype(np.float32)


def _topk_prefix_nbytes() -> int:
    """Geometry (k u16, chunk u16, tile u8, bits u8) and frame flag before a topk body."""
    return struct.calcsize("<HHBB") + 1


@dataclass(frozen=True)
class ChunkGrid:
    """Every chunk of a model, in chunk-major order (see module doc)."""

    shapes: tuple[tuple[int, ...], ...]  # per tensor, in name order
    chunk_sizes: np.ndarray  # int64 [chunks]: elements per chunk
    chunk_kept: np.ndarray  # int64 [chunks]: min(k, size), what a contribution sends
    chunk_tensor: np.ndarray  # int64 [chunks]: which tensor each chunk belongs to
    chunk_start: np.ndarray  # int64 [chunks + 1]: first coordinate of each chunk, then total
    tensor_first_chunk: np.ndarray  # int64 [tensors + 1]

    @property
    def num_chunks(self) -> int:
        return int(self.chunk_sizes.size)

    @property
    def numel(self) -> int:
        return int(self.chunk_start[-1])


def chunk_grid(shapes: Sequence[Sequence[int]], codec: TopKCodec) -> ChunkGrid:
    layouts = [chunk_layout(tuple(s), codec.chunk, codec.tile) for s in shapes]
    sizes = [layout.chunk_sizes() for layout in layouts]
    chunk_sizes = np.concatenate(sizes).astype(np.int64)
    counts = np.array([s.size for s in sizes], dtype=np.int64)
    return ChunkGrid(
        shapes=tuple(tuple(int(d) for d in s) for s in shapes),
        chunk_sizes=chunk_sizes,
        chunk_kept=np.minimum(chunk_sizes, codec.k),
        chunk_tensor=np.repeat(np.arange(len(shapes), dtype=np.int64), counts),
        chunk_start=np.concatenate(([0], np.cumsum(chunk_sizes))).astype(np.int64),
        tensor_first_chunk=np.concatenate(([0], np.cumsum(counts))).astype(np.int64),
    )


def to_coords(grid: ChunkGrid, codec: TopKCodec, tensor: int, flat: np.ndarray) -> np.ndarray:
    """Chunk-major coordinates of flat indices into tensor number `tensor`."""
    layout = chunk_layout(grid.shapes[tensor], codec.chunk, codec.tile)
    row, col = np.divmod(np.asarray(flat, dtype=np.int64), layout.cols)
    grid_row, row_in = np.divmod(row, layout.tile_rows)
    grid_col, col_in = np.divmod(col, layout.tile_cols)
    _, widths = layout.heights_widths()
    chunk = grid.tensor_first_chunk[tensor] + grid_row * layout.grid_cols + grid_col
    return grid.chunk_start[chunk] + row_in * widths[grid_col] + col_in


@dataclass(frozen=True)
class SparseVector:
    """A sparse vector over a grid's coordinates: sorted unique coords, float32 values."""

    coords: np.ndarray
    values: np.ndarray

    def dense(self, numel: int) -> np.ndarray:
        out = np.zeros(numel, dtype=np.float32)
        out[self.coords] = self.values
        return out

    def norm(self) -> float:
        return float(np.sqrt(np.square(self.values, dtype=np.float64).sum()))


def contribution_vector(
    grid: ChunkGrid, codec: TopKCodec, pairs: Sequence[tuple[np.ndarray, np.ndarray]]
) -> SparseVector:
    """A decoded contribution ((flat indices, values) per tensor, in grid order) as a vector."""
    coords = np.concatenate(
        [to_coords(grid, codec, t, np.asarray(flat)) for t, (flat, _) in enumerate(pairs)]
    )
    values = np.concatenate([np.asarray(v, dtype=np.float32) for _, v in pairs])
    order = np.argsort(coords, kind="stable")
    return SparseVector(coords[order], values[order])


def exact_aggregate(contributions: Sequence[SparseVector]) -> SparseVector:
    """SparseLoCo's aggregate (optim/sparseloco.py): each contribution clipped to the median
    (low) L2 norm, then per coordinate the mean over the contributions that sent it."""
    norms = [c.norm() for c in contributions]
    median = statistics.median_low(norms)
    scales = [1.0 if n <= median or n == 0 else median / n for n in norms]
    coords = np.concatenate([c.coords for c in contributions])
    weighted = np.concatenate(
        [c.values.astype(np.float64) * s for c, s in zip(contributions, scales, strict=True)]
    )
    union, inverse = np.unique(coords, return_inverse=True)
    sums = np.bincount(inverse, weights=weighted, minlength=union.size)
    senders = np.bincount(inverse, minlength=union.size)
    return SparseVector(union, (sums / senders).astype(np.float32))


# ---- partition ------------------------------------------------------------------------


def owner_ranges(grid: ChunkGrid, owners: int) -> list[tuple[int, int]]:
    """`owners` consecutive chunk ranges [lo, hi), balanced by the entries a contribution
    sends in them (so every owner receives about 1/owners of each contribution)."""
    kept = np.concatenate(([0], np.cumsum(grid.chunk_kept)))
    cuts = np.searchsorted(kept, [kept[-1] * i / owners for i in range(owners + 1)])
    cuts[0], cuts[-1] = 0, grid.num_chunks
    cuts = np.maximum.accumulate(cuts)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def piece_nbytes(grid: ChunkGrid, codec: TopKCodec, lo: int, hi: int) -> int:
    """Bytes of one contribution restricted to chunks [lo, hi): the topk format per tensor
    it overlaps (header, geometry, value table, codes, positions). Data-independent."""
    total = 0
    tensors = grid.chunk_tensor[lo:hi]
    kept = grid.chunk_kept[lo:hi]
    for tensor in np.unique(tensors).tolist():
        n_kept = int(kept[tensors == tensor].sum())
        total += (
            HEADER.size
            + _topk_prefix_nbytes()
            + (4 << codec.bits)
            + packed_nbytes(n_kept, codec.bits)
            + indices_12bit_nbytes(n_kept)
        )
    return total


def restrict(vector: SparseVector, grid: ChunkGrid, lo: int, hi: int) -> SparseVector:
    a, b = np.searchsorted(vector.coords, [grid.chunk_start[lo], grid.chunk_start[hi]])
    return SparseVector(vector.coords[a:b], vector.values[a:b])


def _chunk_modes(counts: np.ndarray, sizes: np.ndarray, value_bytes: int) -> np.ndarray:
    """Per chunk the cheapest mode for `counts` entries of `sizes` elements."""
    cost = np.stack(
        [
            2 + 1.5 * counts + value_bytes * counts,  # u16 count, 12-bit positions, values
            -(-sizes // 8) + value_bytes * counts,  # bitmap, values
            value_bytes * sizes,  # every value
        ]
    )
    modes = np.argmin(cost, axis=0).astype(np.uint8)
    modes[counts == 0] = EMPTY
    return modes


def encode_shard(
    grid: ChunkGrid, lo: int, hi: int, aggregate: SparseVector, value_bytes: int = 4
) -> bytes:
    """The aggregate over chunks [lo, hi) (entries outside are ignored):
    header | modes, 2 bits per chunk | u16 count per LIST chunk | 12-bit positions of LIST
    chunks | bitmap per BITMAP chunk (ceil(size/8) bytes) | values in coordinate order
    (every element of a DENSE chunk), at `value_bytes` each."""
    part = restrict(aggregate, grid, lo, hi)
    starts, sizes = grid.chunk_start[lo:hi], grid.chunk_sizes[lo:hi]
    chunk = np.searchsorted(starts, part.coords, side="right") - 1  # within the range
    pos = part.coords - starts[chunk]
    counts = np.bincount(chunk, minlength=hi - lo)
    modes = _chunk_modes(counts, sizes, value_bytes)
    entry_mode = modes[chunk]
    list_counts = counts[modes == LIST].astype("<u2")
    positions = pack_indices_12bit(pos[entry_mode == LIST])
    padded = -(-sizes // 8) * 8
    bit_offset = np.concatenate(([0], np.cumsum(np.where(modes == BITMAP, padded, 0))))
    bits = np.zeros(int(bit_offset[-1]), dtype=bool)
    in_bitmap = entry_mode == BITMAP
    bits[bit_offset[chunk[in_bitmap]] + pos[in_bitmap]] = True
    value_counts = np.where(modes == DENSE, sizes, counts)
    value_offset = np.concatenate(([0], np.cumsum(value_counts)))
    first_entry = np.concatenate(([0], np.cumsum(counts)))
    slot = np.where(
        entry_mode == DENSE, pos, np.arange(chunk.size) - first_entry[chunk]
    )  # where each entry's value goes within its chunk
    values = np.zeros(int(value_offset[-1]), dtype=VALUE_DTYPES[value_bytes])
    values[value_offset[chunk] + slot] = (
        part.values if value_bytes == 4 else to_bfloat16_bits(part.values)
    )
    body = b"".join(
        (
            pack_bits(modes, 2),
            list_counts.tobytes(),
            positions,
            np.packbits(bits, bitorder="little").tobytes(),
            values.tobytes(),
        )
    )
    fields = (SHARD_MAGIC, 1, value_bytes, lo, hi)
    crc = zlib.crc32(body, zlib.crc32(SHARD_HEADER.pack(*fields, 0)[:-4]))
    return SHARD_HEADER.pack(*fields, crc) + body


def decode_shard(grid: ChunkGrid, data: bytes) -> SparseVector:
    """`encode_shard`'s inverse; a DENSE chunk gives every coordinate of the chunk."""
    magic, version, value_bytes, lo, hi, crc = SHARD_HEADER.unpack_from(data)
    body = memoryview(data)[SHARD_HEADER.size :]
    if magic != SHARD_MAGIC or version != 1 or value_bytes not in VALUE_DTYPES:
        raise ValueError("not an aggregated shard")
    if zlib.crc32(body, zlib.crc32(data[: SHARD_HEADER.size - 4])) != crc:
        raise ValueError("aggregated shard fails its CRC32")
    starts, sizes = grid.chunk_start[lo:hi], grid.chunk_sizes[lo:hi]
    at = packed_nbytes(hi - lo, 2)
    modes = unpack_bits(bytes(body[:at]), 2, hi - lo)
    n_list = int((modes == LIST).sum())
    list_counts = np.frombuffer(body[at : at + 2 * n_list], dtype="<u2").astype(np.int64)
    at += 2 * n_list
    n_positions = int(list_counts.sum())
    positions = unpack_indices_12bit(
        bytes(body[at : at + indices_12bit_nbytes(n_positions)]), n_positions
    ).astype(np.int64)
    at += indices_12bit_nbytes(n_positions)
    padded = np.where(modes == BITMAP, -(-sizes // 8) * 8, 0)
    n_bitmap_bytes = int(padded.sum()) // 8
    bits = np.unpackbits(
        np.frombuffer(body[at : at + n_bitmap_bytes], dtype=np.uint8), bitorder="little"
    ).astype(bool)
    at += n_bitmap_bytes
    bit_offset = np.concatenate(([0], np.cumsum(padded)))
    counts = np.zeros(hi - lo, dtype=np.int64)
    counts[modes == LIST] = list_counts
    counts[modes == DENSE] = sizes[modes == DENSE]
    bitmap_chunks = np.flatnonzero(modes == BITMAP)
    counts[bitmap_chunks] = np.add.reduceat(bits, bit_offset[bitmap_chunks]) if bits.size else 0
    chunk = np.repeat(np.arange(hi - lo), counts)
    pos = np.empty(chunk.size, dtype=np.int64)
    entry_mode = modes[chunk]
    pos[entry_mode == LIST] = positions
    set_bits = np.flatnonzero(bits)
    owner = np.searchsorted(bit_offset, set_bits, side="right") - 1
    pos[entry_mode == BITMAP] = set_bits - bit_offset[owner]
    first_entry = np.concatenate(([0], np.cumsum(counts)))
    dense = entry_mode == DENSE
    pos[dense] = np.arange(chunk.size)[dense] - first_entry[chunk[dense]]
    values = np.frombuffer(body[at:], dtype=VALUE_DTYPES[value_bytes])
    if values.size != chunk.size:
        raise ValueError(f"aggregated shard holds {values.size} values, its index {chunk.size}")
    values = values.astype(np.float32) if value_bytes == 4 else from_bfloat16_bits(values)
    return SparseVector(starts[chunk] + pos, values)


def per_peer_download(
    contribution_nbytes: Sequence[int],
    piece_bytes: Sequence[int],
    shard_bytes: Sequence[int],
) -> dict[str, list[int]]:
    """Per peer j (owner of range j), the bytes it downloads in a round:
    gather: every other peer's contribution; partition: every other participant's piece of
    its range, then every other owner's aggregated shard."""
    n = len(contribution_nbytes)
    total_c, total_s = sum(contribution_nbytes), sum(shard_bytes)
    return {
        "gather": [total_c - contribution_nbytes[j] for j in range(n)],
        "partition": [(n - 1) * piece_bytes[j] + total_s - shard_bytes[j] for j in range(n)],
    }
