"""`topk`: SparseLoCo's wire codec (Templar, arXiv 2508.15706, section 3): per chunk of a
tensor keep the k largest |x|, send their values at 2 bits and their in-chunk positions at
12 bits. With the defaults (64 of 4096, 2-bit values) that is about 64·14/4096 ≈ 0.22 bits
per parameter, >140x less than fp32.

Geometry (`chunk_layout`), a pure function of the tensor shape, so it is never sent:
* a 2-D tensor is cut into `tile` x `tile` blocks (64x64 = 4096 by default), row-major over
  the grid of blocks; the blocks on the bottom and right edges are smaller (ragged);
* any other tensor (scalar, 1-D, 3-D+) is flattened and cut into `chunk`-element chunks,
  the last one ragged.
Every chunk has at most 4096 elements, so a position inside it fits in 12 bits. A chunk of
n elements keeps min(k, n) entries, so the number of kept values follows from the shape.

Values: all kept values of the tensor are quantized together as one chunk by
`quantize.quantize_chunks` (2**bits uniform bins over mean ± `range_sigmas`·σ, decoded
through per-bin means, so no bias), i.e. one small table per tensor.

Body layout after the shared header (`base.py`), little-endian:

    k u16 | chunk u16 | tile u8 | bits u8 | frame flag u8 | inner (stored, or one zstd frame)
    inner = table float32[2**bits] | codes, `bits` bits each | positions, 12 bits each

Codes and positions are in chunk order; within a chunk the positions (row-major inside the
ragged chunk/tile) are strictly increasing, which is also how duplicates are refused. The
geometry fields are checked against the receiver's own configuration (6 bytes per tensor,
~0.002 bits/param on `small`): a peer configured with another k or tile would otherwise
send payloads of plausible length whose positions mean something else. The inner part is
zstd-framed (`framing.py`) only when that makes it smaller, which for near-random codes
and positions is essentially never; `payload_nbytes` gives the stored size, which is then
exact (and an upper bound otherwise).

A model's tensors go through one batch (`encode_many`, `decode_many`, `decode_sparse_many`):
their chunks are stacked as the rows of one matrix for the selection, and their values,
codes and positions are quantized, packed, checked and mapped in one pass each. The bytes
are exactly those of `encode` tensor by tensor, and a bad payload in a batch raises the
error it raises alone (`BatchCodecError` says which).
"""

from __future__ import annotations

import math
import struct
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from .base import _CRC_OFFSET, HEADER, MAGIC, Codec, CodecError, as_float32_values, normalize_shape
from .framing import FrameTooLarge, zstd_frame, zstd_unframe
from .packing import (
    indices_12bit_nbytes,
    pack_bits_many,
    pack_indices_12bit_many,
    packed_nbytes,
    segment_slots,
    unpack_bits,
    unpack_indices_12bit,
)
from .quantize import quantize_segments

MAX_CHUNK_ELEMENTS = 4096  # positions are sent in 12 bits
_GEOMETRY = struct.Struct("<HHBB")  # k, chunk, tile, bits
_PREFIX_NBYTES = _GEOMETRY.size + 1  # geometry + frame flag


@dataclass(frozen=True)
class ChunkLayout:
    """How a tensor is cut into chunks: a (rows, cols) matrix view of it, tiled in
    `tile_rows` x `tile_cols` blocks (a flattened tensor is one row and tiles of 1 x chunk).
    Chunk g is block (g // grid_cols, g % grid_cols); edge blocks are ragged."""

    rows: int
    cols: int
    tile_rows: int
    tile_cols: int

    @property
    def grid_rows(self) -> int:
        return -(-self.rows // self.tile_rows)

    @property
    def grid_cols(self) -> int:
        return -(-self.cols // self.tile_cols)

    @property
    def num_chunks(self) -> int:
        return self.grid_rows * self.grid_cols

    def _edges(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(size, how many) of the block heights and widths, from arithmetic alone."""
        def sizes(total: int, tile: int) -> list[tuple[int, int]]:
            full, tail = divmod(total, tile)
            return [(tile, full)] + ([(tail, 1)] if tail else [])
        return sizes(self.rows, self.tile_rows), sizes(self.cols, self.tile_cols)

    def kept_total(self, k: int) -> int:
        """Σ over chunks of min(k, chunk size), without building per-chunk arrays (a lying
        element count must not make the receiver allocate). Memoized per (layout, k)."""
        return _kept_total(self, k)

    @cached_property
    def _heights_widths(self) -> tuple[np.ndarray, np.ndarray]:
        heights = np.full(self.grid_rows, self.tile_rows, dtype=np.int64)
        widths = np.full(self.grid_cols, self.tile_cols, dtype=np.int64)
        if heights.size:
            heights[-1] = self.rows - (self.grid_rows - 1) * self.tile_rows
        if widths.size:
            widths[-1] = self.cols - (self.grid_cols - 1) * self.tile_cols
        heights.flags.writeable = widths.flags.writeable = False  # shared by every caller
        return heights, widths

    def heights_widths(self) -> tuple[np.ndarray, np.ndarray]:
        """Per grid row, the block height; per grid column, the block width (int64, read-only)."""
        return self._heights_widths

    def chunk_sizes(self) -> np.ndarray:
        """Elements per chunk, in chunk order (int64 [num_chunks])."""
        heights, widths = self.heights_widths()
        return np.multiply.outer(heights, widths).reshape(-1)

    @cached_property
    def chunk_origin(self) -> np.ndarray:
        """Per chunk, the flat index of its first element (int64, read-only)."""
        grid_row, grid_col = np.divmod(np.arange(self.num_chunks, dtype=np.int64), self.grid_cols)
        origin = grid_row * self.tile_rows * self.cols + grid_col * self.tile_cols
        origin.flags.writeable = False
        return origin


@lru_cache(maxsize=4096)
def _kept_total(layout: ChunkLayout, k: int) -> int:
    heights, widths = layout._edges()
    return sum(nh * nw * min(k, h * w) for h, nh in heights for w, nw in widths)


def chunk_layout(shape: Sequence[int], chunk: int = 4096, tile: int = 64) -> ChunkLayout:
    """The chunking of a tensor of `shape`: tile x tile blocks for 2-D, else `chunk`-element
    runs of the flattened tensor (see module doc). Memoized: a model has few shapes, and
    a layout caches its block sizes."""
    return _layout(normalize_shape(shape), chunk, tile)


@lru_cache(maxsize=4096)
def _layout(dims: tuple[int, ...], chunk: int, tile: int) -> ChunkLayout:
    if len(dims) == 2:
        return ChunkLayout(dims[0], dims[1], tile, tile)
    return ChunkLayout(1, math.prod(dims), 1, chunk)


_scratch = threading.local()


def _workspace(name: str, size: int, dtype: type) -> np.ndarray:
    """A flat scratch array of `size` elements, reused by this thread across calls (grown
    when too small). Whatever is returned from the codec must not be a view of one."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffer = buffers[name] = np.empty(max(size, 1), dtype=dtype)
    return buffer[:size]


# Pass 1 samples every 9th entry: coprime with a tile's 64 columns, so the sample spans
# all of them (a weight's columns can differ in scale; stride 8 saw only 8 of 64 and
# misjudged some rows by 5x).
_SAMPLE_STRIDE = 9


def _kth_by_partition(rows: np.ndarray, k: int) -> np.ndarray:
    # on negated values, k-th smallest: numpy's introselect is several times faster with
    # the target near the front than near the back
    negated = np.negative(rows)
    negated.partition(k - 1, axis=1)
    return -negated[:, k - 1]


@dataclass(frozen=True)
class _Candidates:
    """Per row of a matrix, its exact k-th largest, and the entries at or above a floor
    below it (see `_candidates`)."""

    kth: np.ndarray
    complete: np.ndarray  # every entry >= kth is a candidate
    tied: np.ndarray  # (complete rows) the (k+1)-th largest equals the k-th
    flat: np.ndarray  # row-major flat indices of all candidates, increasing
    values: np.ndarray  # their values
    row_of: np.ndarray  # their rows


def _candidates(rows: np.ndarray, k: int) -> _Candidates:
    """Per row of a float32 matrix (1 <= k <= width), the exact k-th largest value, found
    from a superset of the entries at or above it (about 5x faster than one np.partition
    of 4096-wide rows at k = 64).

    Pass 1 takes every 9th entry of a row and finds its j-th largest, the floor, with
    j = ceil(2k/9): about 2k entries of the row are >= the floor (never fewer than j). Those
    are the row's candidates. Where there are at least k, the row's k-th largest is >= the
    floor and is the k-th largest of its candidates, which pass 2 finds in a matrix about
    2k wide. Rows with fewer than k candidates, or over 4k (ties at the floor), take a full
    partition instead. Exact in every case, ties included."""
    n_rows, width = rows.shape
    kth = np.empty(n_rows, dtype=rows.dtype)
    complete = np.zeros(n_rows, dtype=np.bool_)
    tied = np.zeros(n_rows, dtype=np.bool_)
    j = -(-2 * k // _SAMPLE_STRIDE)
    if n_rows == 0 or -(-width // _SAMPLE_STRIDE) < 4 * j:
        if n_rows:
            kth[:] = _kth_by_partition(rows, k)
        empty = np.empty(0, dtype=np.int64)
        return _Candidates(kth, complete, tied, empty, np.empty(0, dtype=rows.dtype), empty)
    sample = np.negative(rows[:, ::_SAMPLE_STRIDE])
    sample.partition(j - 1, axis=1)
    floor = np.negative(sample[:, j - 1])
    is_candidate = np.greater_equal(rows, floor[:, None], out=_workspace("candidate", rows.size, np.bool_).reshape(rows.shape))
    flat = np.flatnonzero(is_candidate)  # row-major, so grouped by row (7x faster than 2-D nonzero)
    values = np.take(rows.reshape(-1), flat)
    bounds = np.searchsorted(flat, np.arange(n_rows + 1, dtype=np.int64) * width)
    starts, counts = bounds[:-1], np.diff(bounds)
    row_of = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    complete = (counts >= k) & (counts <= 4 * k)
    n_complete = int(np.count_nonzero(complete))
    if n_complete:
        # pass 2: each complete row's candidates, negated and left-aligned in one matrix
        # padded with +inf, so the k-th smallest of a row is the k-th largest candidate
        max_count = int(counts[complete].max())
        compact = np.cumsum(complete) - 1
        slot = np.arange(flat.size, dtype=np.int64) + np.repeat(compact * max_count - starts, counts)
        negated = np.full((n_complete, max_count), np.inf, dtype=rows.dtype)
        if n_complete == n_rows:
            negated.reshape(-1)[slot] = -values
        else:
            chosen = complete[row_of]
            negated.reshape(-1)[slot[chosen]] = -values[chosen]
        negated.partition(k - 1, axis=1)
        # tied: another candidate equals the k-th (all after it in the partition are >=)
        tied[complete] = (negated[:, k:] == negated[:, k - 1 : k]).any(axis=1)
        kth[complete] = -negated[:, k - 1]
    if n_complete < n_rows:
        kth[~complete] = _kth_by_partition(rows[~complete], k)
    return _Candidates(kth, complete, tied, flat, values, row_of)


def kth_largest_per_row(rows: np.ndarray, k: int) -> np.ndarray:
    """The exact k-th largest value of each row of a float32 matrix (1 <= k <= width)."""
    return _candidates(rows, k).kth


def _keep_rows(rows: np.ndarray, threshold: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Boolean mask of the entries of `rows` kept at `threshold` (per row): all at or above
    it, except that ties at it keep only the lowest positions, up to the row's quota."""
    keep = rows >= threshold[:, None]
    over = np.flatnonzero(np.count_nonzero(keep, axis=1) > quota)
    if over.size:  # ties at the threshold: all above it, then the first equal ones
        tied, limit = rows[over], threshold[over, None]
        above = tied > limit
        equal = tied == limit
        room = (quota[over] - above.sum(axis=1))[:, None]
        keep[over] = above | (equal & (np.cumsum(equal, axis=1) <= room))
    return keep


def kept_entries(blocks: np.ndarray, k: int, quota: np.ndarray) -> np.ndarray:
    """Row-major flat indices (increasing) of the entries top-k keeps in `blocks` (|x|,
    one chunk per row, ragged chunks padded with -1): per row everything at or above its
    k-th largest (never below 0, so padding is never kept); ties at that threshold keep
    the lowest positions, so a row never keeps more than its quota min(k, chunk size).

    A complete row (see `_candidates`) whose k-th largest is not tied keeps exactly the
    candidates at or above it: its quota when that k-th is >= 0, else its whole (short)
    chunk, again its quota. Every other row is redone on its full width."""
    width = blocks.shape[1]
    found = _candidates(blocks, min(k, width))
    threshold = np.maximum(found.kth, 0.0)
    is_kept = found.values >= threshold[found.row_of]
    redo = ~found.complete | found.tied
    if not redo.any():
        return found.flat[is_kept]
    is_kept &= ~redo[found.row_of]
    redone = np.flatnonzero(redo)
    redone_row, column = np.divmod(np.flatnonzero(_keep_rows(blocks[redone], threshold[redone], quota[redone])), width)
    return np.sort(np.concatenate((found.flat[is_kept], redone[redone_row] * width + column)))


@dataclass(frozen=True)
class _ReceivePlan:
    """Per kept slot (in wire order) of the payloads of several tensors laid end to end:
    its chunk's size and width, the flat index of the chunk's first element, and where
    the tensors' codes and positions sit once their packed fields are joined back to back
    (each field padded to whole bytes; an odd positions field completed with one zero
    byte). A pure function of (layouts, k, bits), so computed once per model (read-only)."""

    bounds: np.ndarray  # tensor t's slots are bounds[t]:bounds[t + 1]
    size: np.ndarray  # int32
    width: np.ndarray  # int32
    base: np.ndarray
    dense_base: np.ndarray  # base + the offset of the slot's tensor among all tensors' elements
    cols: np.ndarray  # the tensor's column count
    same_chunk: np.ndarray  # slot i+1 is in the same chunk (of the same tensor) as slot i
    table_key: np.ndarray  # tensor · 2**bits: where its table starts in the joined tables
    code_count: int  # codes in the joined code fields, padding included
    code_slots: np.ndarray | None  # where the sent codes are among them (None: no padding)
    code_padding: np.ndarray  # where the padding codes are (must be 0)
    index_count: int
    index_slots: np.ndarray | None
    index_padding: np.ndarray


def _padding_slots(lengths: np.ndarray, padded: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    if (padded == lengths).all():
        return None, np.empty(0, dtype=np.intp)
    slots = segment_slots(lengths, padded)
    is_padding = np.ones(int(padded.sum()), dtype=np.bool_)
    is_padding[slots] = False
    return slots, np.flatnonzero(is_padding)


@lru_cache(maxsize=64)
def _receive_plan(layouts: tuple[ChunkLayout, ...], k: int, bits: int) -> _ReceivePlan:
    # built only after every payload passed its length checks, so sized by what was
    # received (kept_total(k) >= number of chunks: each keeps >= 1)
    owners = [np.repeat(np.arange(layout.num_chunks, dtype=np.int64), np.minimum(layout.chunk_sizes(), k)) for layout in layouts]
    n_kept = np.array([owner.size for owner in owners], dtype=np.intp)

    def per_slot(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([*arrays, np.empty(0, dtype=np.int64)])

    def per_tensor(values: list[int]) -> np.ndarray:
        return np.repeat(np.array(values, dtype=np.int64), n_kept)

    chunk = per_slot(owners) + per_tensor(np.cumsum([0] + [layout.num_chunks for layout in layouts])[:-1].tolist())
    base = per_slot([layout.chunk_origin[owner] for layout, owner in zip(layouts, owners, strict=True)])
    code_nbytes = (n_kept * bits + 7) // 8
    code_slots, code_padding = _padding_slots(n_kept, code_nbytes * (8 // bits))
    index_slots, index_padding = _padding_slots(n_kept, n_kept + n_kept % 2)
    plan = _ReceivePlan(
        bounds=np.concatenate(([0], np.cumsum(n_kept))),
        size=per_slot([layout.chunk_sizes()[owner] for layout, owner in zip(layouts, owners, strict=True)]).astype(np.int32),
        width=per_slot([layout.heights_widths()[1][owner % layout.grid_cols] for layout, owner in zip(layouts, owners, strict=True)]).astype(np.int32),
        base=base,
        dense_base=base + per_tensor(np.cumsum([0] + [layout.rows * layout.cols for layout in layouts])[:-1].tolist()),
        cols=per_tensor([layout.cols for layout in layouts]),
        same_chunk=chunk[1:] == chunk[:-1],
        table_key=(per_tensor(list(range(len(layouts)))) << bits).astype(np.int32),
        code_count=int(code_nbytes.sum()) * (8 // bits),
        code_slots=code_slots,
        code_padding=code_padding,
        index_count=int((n_kept + n_kept % 2).sum()),
        index_slots=index_slots,
        index_padding=index_padding,
    )
    for array in vars(plan).values():
        if isinstance(array, np.ndarray):
            array.flags.writeable = False
    return plan


@dataclass(frozen=True)
class _SendPlan:
    """How `encode_many` stacks the chunks of several tensors (all of one padded chunk
    width) as the rows of one matrix, and per row what maps a kept entry back to its
    tensor and its in-chunk position."""

    first_rows: np.ndarray  # tensor j's chunks are rows first_rows[j]:first_rows[j + 1]
    quota: np.ndarray  # min(k, chunk size)
    tile_cols: np.ndarray  # the tensor's tile width (its row stride in the padded chunk)
    chunk_cols: np.ndarray  # the chunk's own width (ragged at the right edge)
    cols: np.ndarray  # the tensor's column count
    origin: np.ndarray  # the flat index of the chunk's first element

    @property
    def n_rows(self) -> int:
        return int(self.first_rows[-1])


@lru_cache(maxsize=64)
def _send_plan(layouts: tuple[ChunkLayout, ...], k: int) -> _SendPlan:
    n_chunks = [layout.num_chunks for layout in layouts]

    def per_tensor(values: list[int]) -> np.ndarray:
        return np.repeat(np.array(values, dtype=np.int64), n_chunks)

    return _SendPlan(
        first_rows=np.cumsum([0] + n_chunks),
        quota=np.concatenate([np.minimum(layout.chunk_sizes(), k) for layout in layouts]),
        tile_cols=per_tensor([layout.tile_cols for layout in layouts]),
        chunk_cols=np.concatenate([np.tile(layout.heights_widths()[1], layout.grid_rows) for layout in layouts]),
        cols=per_tensor([layout.cols for layout in layouts]),
        origin=np.concatenate([layout.chunk_origin for layout in layouts]),
    )


def _float32_values(tensor: torch.Tensor) -> np.ndarray:
    """`as_float32_values` less its finiteness check, which `_select_many` makes once for
    all tensors (one max over their blocks, instead of one isfinite pass per tensor)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        return as_float32_values(tensor)  # raises its CodecError
    return tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()


class BatchCodecError(CodecError):
    """A payload of `decode_many`/`decode_sparse_many` fails: `index` is the first that
    fails on its own, and the message is the error it gives alone."""

    def __init__(self, index: int, error: CodecError) -> None:
        super().__init__(str(error))
        self.index = index


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"topk: {name} must be an int in [{low}, {high}], got {value!r}")
    return value


class TopKCodec(Codec):
    """Top-k per chunk/tile, 2-bit values, 12-bit positions (see module doc).

    Options: `k` kept per chunk (64), `chunk` elements per chunk of non-2-D tensors (4096),
    `tile` side of the blocks of 2-D tensors (64), `bits` per value (2), `range_sigmas`
    half-width of the quantizer's range (6)."""

    name = "topk"
    codec_id = 6

    def __init__(
        self, *, k: int = 64, chunk: int = 4096, tile: int = 64, bits: int = 2, range_sigmas: float = 6.0
    ) -> None:
        self.k = _check_int("k", k, 1, MAX_CHUNK_ELEMENTS)
        self.chunk = _check_int("chunk", chunk, 1, MAX_CHUNK_ELEMENTS)
        self.tile = _check_int("tile", tile, 1, math.isqrt(MAX_CHUNK_ELEMENTS))
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (1, 2, 4, 8):
            raise ValueError(f"topk: bits must be one of 1, 2, 4, 8, got {bits!r}")
        self.bits = bits
        if isinstance(range_sigmas, bool) or not (
            isinstance(range_sigmas, int | float) and math.isfinite(range_sigmas) and range_sigmas > 0
        ):
            raise ValueError(f"topk: range_sigmas must be a positive finite number, got {range_sigmas!r}")
        self.range_sigmas = float(range_sigmas)

    # -- selection -------------------------------------------------------------------

    def topk_select(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices int64, values float32) of the entries `encode` keeps, chunk by
        chunk, positions increasing within a chunk; values are the exact (unquantized) ones.
        CodecError for non-float or non-finite tensors."""
        values = as_float32_values(tensor)
        flat, _, _ = self._select_many([values], [chunk_layout(tuple(tensor.shape), self.chunk, self.tile)])
        return torch.from_numpy(flat), torch.from_numpy(values[flat])

    @staticmethod
    def _write_blocks(values: np.ndarray, layout: ChunkLayout, out: np.ndarray) -> None:
        """|x| into `out` ([num_chunks, tile_rows·tile_cols] float32) with one chunk per row,
        in one pass (abs of a transposed view); ragged chunks padded with -1 (never kept:
        thresholds are >= 0)."""
        tr, tc, gr, gc = layout.tile_rows, layout.tile_cols, layout.grid_rows, layout.grid_cols
        if tr == 1:  # a flattened tensor: the chunks are consecutive runs, only the last ragged
            np.abs(values, out=out.reshape(-1)[: values.size])
            out.reshape(-1)[values.size :] = -1.0
            return
        matrix = values.reshape(layout.rows, layout.cols)
        if (gr * tr, gc * tc) != matrix.shape:  # ragged edges: pad (a copy, rare and small)
            padded = np.full((gr * tr, gc * tc), -1.0, dtype=np.float32)
            padded[: layout.rows, : layout.cols] = matrix
            np.abs(padded[: layout.rows, : layout.cols], out=padded[: layout.rows, : layout.cols])
            np.copyto(out.reshape(gr, gc, tr, tc), padded.reshape(gr, tr, gc, tc).transpose(0, 2, 1, 3))
        else:  # torch: its strided copy is about 2x numpy's (one thread, cold cache)
            tiles = torch.from_numpy(values).view(gr, tr, gc, tc).permute(0, 2, 1, 3)
            torch.abs(tiles, out=torch.from_numpy(out).view(gr, gc, tr, tc))

    def _select_many(self, values: Sequence[np.ndarray], layouts: Sequence[ChunkLayout]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept entries of several tensors, back to back in tensor order: (flat indices
        into their tensor, in-chunk positions), both int64 in chunk order with positions
        increasing within a chunk, and per tensor how many.

        The chunks of all tensors are stacked as the rows of one matrix per chunk width, so
        thresholds, ties, the row-major scan (which yields wire order) and the mapping back
        to tensors each run once for a whole model instead of once per tensor."""
        lengths = np.zeros(len(values), dtype=np.intp)
        by_width: dict[int, list[int]] = {}
        for i, layout in enumerate(layouts):
            if layout.num_chunks:
                by_width.setdefault(layout.tile_rows * layout.tile_cols, []).append(i)
        groups = []
        for width, members in by_width.items():
            plan = _send_plan(tuple(layouts[i] for i in members), self.k)
            # a reused per-thread buffer: a fresh one costs more in page faults than the copy
            blocks = _workspace("blocks", plan.n_rows * width, np.float32).reshape(-1, width)
            for j, i in enumerate(members):
                self._write_blocks(values[i], layouts[i], blocks[plan.first_rows[j] : plan.first_rows[j + 1]])
            if not math.isfinite(blocks.max()):  # NaN and Inf survive abs and max
                raise CodecError("tensor holds NaN/Inf value(s) (or values beyond float32 range)")
            kept = kept_entries(blocks, self.k, plan.quota)
            row, padded_position = np.divmod(kept, width)
            row_in, col_in = np.divmod(padded_position, plan.tile_cols[row])
            positions = row_in * plan.chunk_cols[row] + col_in
            flat = plan.origin[row] + row_in * plan.cols[row] + col_in
            lengths[members] = np.diff(np.searchsorted(kept, plan.first_rows * width))
            groups.append((members, flat, positions))
        if len(groups) == 1:  # one chunk width (the defaults: 64·64 = 4096): already in order
            return groups[0][1], groups[0][2], lengths
        pieces: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for members, flat, positions in groups:
            ends = np.cumsum(lengths[members])
            for i, start, end in zip(members, (ends - lengths[members]).tolist(), ends.tolist(), strict=True):
                pieces[i] = flat[start:end], positions[start:end]
        ordered = [pieces[i] for i in sorted(pieces)]
        return (
            np.concatenate([flat for flat, _ in ordered] + [np.empty(0, np.int64)]),
            np.concatenate([positions for _, positions in ordered] + [np.empty(0, np.int64)]),
            lengths,
        )

    # -- wire ------------------------------------------------------------------------

    def encode(self, tensor: torch.Tensor) -> bytes:
        """Encode a floating-point tensor (any shape, any device) into a payload."""
        return self.encode_many([tensor])[0]

    def encode_many(self, tensors: Sequence[torch.Tensor]) -> list[bytes]:
        """`encode` of several tensors (a model's pseudo-gradient, tensor by tensor), with
        the selection, the value quantization and the bit packing batched over all of them
        (what SparseLoCo sends each round)."""
        try:
            values = [_float32_values(t) for t in tensors]
            bodies = self._bodies(values, [tuple(t.shape) for t in tensors])
        except CodecError:  # raise what the tensor-by-tensor check raises first
            for tensor in tensors:
                as_float32_values(tensor)
            raise
        payloads = []
        for value, body in zip(values, bodies, strict=True):
            prefix = HEADER.pack(MAGIC, self.codec_id, self.version, value.size, 0)[:_CRC_OFFSET]
            crc = zlib.crc32(body, zlib.crc32(prefix))
            payloads.append(b"".join((prefix, struct.pack("<I", crc), body)))
        return payloads

    def _bodies(self, values: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]) -> list[bytes]:
        flat, positions, lengths = self._select_many(values, [chunk_layout(shape, self.chunk, self.tile) for shape in shapes])
        ends = np.cumsum(lengths)
        kept = np.empty(flat.size, dtype=np.float32)
        for value, start, end in zip(values, (ends - lengths).tolist(), ends.tolist(), strict=True):
            np.take(value, flat[start:end], out=kept[start:end], mode="clip")  # in range by construction
        nonempty = lengths > 0
        tables = np.zeros((len(values), 1 << self.bits), dtype=np.float32)
        codes = np.empty(0, dtype=np.uint8)
        if nonempty.any():
            tables[nonempty], codes = quantize_segments(kept, lengths[nonempty], self.bits, self.range_sigmas)
        table_bytes, table_nbytes = memoryview(tables.astype("<f4").tobytes()), 4 << self.bits
        code_fields = pack_bits_many(codes, lengths, self.bits)  # quantizer output: in range
        index_fields = pack_indices_12bit_many(positions, lengths)  # in-chunk positions: < 4096 by layout
        geometry = _GEOMETRY.pack(self.k, self.chunk, self.tile, self.bits)
        return [
            geometry + zstd_frame(b"".join((table_bytes[i * table_nbytes : (i + 1) * table_nbytes], code_field, index_field)))
            for i, (code_field, index_field) in enumerate(zip(code_fields, index_fields, strict=True))
        ]

    def decode(self, payload: bytes, shape: Sequence[int]) -> torch.Tensor:
        """A dense float32 CPU tensor of `shape`: zeros except the sent entries; CodecError
        for anything malformed."""
        dims = normalize_shape(shape)
        flat, values, _ = self._decode_joined([payload], [dims], dense=False)
        dense = np.zeros(math.prod(dims), dtype=np.float32)
        dense[flat] = values
        return torch.from_numpy(dense).reshape(dims)

    def decode_sparse(self, payload: bytes, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices int64, values float32) a peer sent for a tensor of `shape`, in
        chunk order, with all of decode's validation. A sent value may be 0."""
        flat, values, _ = self._decode_joined([payload], [normalize_shape(shape)], dense=False)
        return torch.from_numpy(flat), torch.from_numpy(values)

    def decode_many(self, payloads: Sequence[bytes], shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """`decode` of several payloads (a contribution, tensor by tensor) in one batch;
        BatchCodecError names the first payload that fails. The tensors are views of one
        buffer: a fresh allocation per tensor costs more in page faults than the decode."""
        dims = [normalize_shape(shape) for shape in shapes]
        flat, values, _ = self._decode_batch(payloads, dims, dense=True)
        counts = [math.prod(shape) for shape in dims]
        dense = np.zeros(sum(counts), dtype=np.float32)  # calloc: pages zeroed as touched
        dense[flat] = values
        return [part.view(shape) for part, shape in zip(torch.from_numpy(dense).split(counts), dims, strict=True)]

    def decode_sparse_many(
        self, payloads: Sequence[bytes], shapes: Sequence[Sequence[int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`decode_sparse` of several payloads in one batch (views of two shared arrays);
        BatchCodecError names the first payload that fails."""
        flat, values, bounds = self._decode_batch(payloads, [normalize_shape(shape) for shape in shapes], dense=False)
        flat_tensor, value_tensor = torch.from_numpy(flat), torch.from_numpy(values)
        return [(flat_tensor[start:end], value_tensor[start:end]) for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]

    def _decode_batch(
        self, payloads: Sequence[bytes], dims: Sequence[tuple[int, ...]], dense: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_decode_joined` of all payloads at once. If any check fails, they are decoded
        again one by one, so the error is the one the first bad payload gives alone."""
        if len(payloads) != len(dims):
            raise ValueError(f"topk: {len(payloads)} payloads for {len(dims)} shapes")
        try:
            return self._decode_joined(payloads, dims, dense)
        except CodecError:
            for index, (payload, shape) in enumerate(zip(payloads, dims, strict=True)):
                try:
                    self._decode_joined([payload], [shape], dense)
                except CodecError as exc:
                    raise BatchCodecError(index, exc) from None
            raise AssertionError("topk: a batch refused payloads that each decode alone") from None

    def _decode_joined(
        self, payloads: Sequence[bytes], dims: Sequence[tuple[int, ...]], dense: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat indices int64, values float32, per-payload bounds) of all payloads, their
        fields joined so each check and mapping runs once; with `dense` the indices are
        into all the tensors' elements laid end to end. For one payload the errors name
        exactly what is wrong with it."""
        layouts = tuple(chunk_layout(shape, self.chunk, self.tile) for shape in dims)
        table_nbytes = 4 << self.bits
        tables: list[memoryview] = []
        code_fields: list[memoryview] = []
        index_fields: list[memoryview | bytes] = []
        for payload, shape, layout in zip(payloads, dims, layouts, strict=True):
            inner, n_kept = self._inner(payload, shape, layout)
            view, codes_end = memoryview(inner), table_nbytes + packed_nbytes(n_kept, self.bits)
            tables.append(view[:table_nbytes])
            code_fields.append(view[table_nbytes:codes_end])
            index_fields.append(view[codes_end:])
            if n_kept % 2:  # the rest of its last 3-byte group, as unpack_indices_12bit does
                index_fields.append(b"\0")
        plan = _receive_plan(layouts, self.k, self.bits)
        table = np.frombuffer(b"".join(tables), dtype="<f4").astype(np.float32)
        if not np.isfinite(table).all():
            raise CodecError("topk value table holds non-finite entries")
        codes = unpack_bits(b"".join(code_fields), self.bits, plan.code_count)
        if codes[plan.code_padding].any():
            raise CodecError(f"padding bits after the last {self.bits}-bit code are not zero")
        positions = unpack_indices_12bit(b"".join(index_fields), plan.index_count)
        if positions[plan.index_padding].any():
            raise CodecError("padding bits after the last 12-bit index are not zero")
        if plan.code_slots is not None:
            codes = codes[plan.code_slots]
        positions = (positions if plan.index_slots is None else positions[plan.index_slots]).astype(np.int32)
        outside = positions >= plan.size
        if outside.any():
            raise CodecError(self._outside_message(layouts, plan, positions, int(np.argmax(outside))))
        if (plan.same_chunk & (positions[1:] <= positions[:-1])).any():
            raise CodecError("topk positions within a chunk must be strictly increasing (duplicate or unordered)")
        row_in, col_in = np.divmod(positions, plan.width)
        flat = (plan.dense_base if dense else plan.base) + row_in * plan.cols + col_in
        return flat, np.take(table, plan.table_key + codes, mode="clip"), plan.bounds  # keys < table.size

    def _outside_message(self, layouts: tuple[ChunkLayout, ...], plan: _ReceivePlan, positions: np.ndarray, at: int) -> str:
        tensor = int(np.searchsorted(plan.bounds, at, side="right")) - 1
        slot = at - int(plan.bounds[tensor])
        chunk = int(np.searchsorted(np.cumsum(np.minimum(layouts[tensor].chunk_sizes(), self.k)), slot, side="right"))
        return f"topk position {int(positions[at])} lies outside chunk {chunk} of {int(plan.size[at])} elements"

    def _inner(self, payload: bytes, dims: tuple[int, ...], layout: ChunkLayout) -> tuple[bytes, int]:
        """The inner part of a payload for a tensor of `dims` (header, CRC, geometry, frame
        and length checked), and how many values it holds."""
        body = self._read_header(payload, math.prod(dims))
        n_kept = layout.kept_total(self.k)
        inner_nbytes = self._inner_nbytes(n_kept)
        if len(body) < _PREFIX_NBYTES:
            raise CodecError(f"topk body is {len(body)} bytes; its geometry and frame flag need {_PREFIX_NBYTES}")
        geometry = _GEOMETRY.unpack_from(body)
        if geometry != (self.k, self.chunk, self.tile, self.bits):
            raise CodecError(
                "topk payload was encoded with k={}, chunk={}, tile={}, bits={}; this receiver "
                "needs k={}, chunk={}, tile={}, bits={}".format(*geometry, self.k, self.chunk, self.tile, self.bits)
            )
        try:
            inner = zstd_unframe(body[_GEOMETRY.size :], max_size=inner_nbytes)
        except FrameTooLarge as exc:
            raise CodecError(f"topk body holds {exc.size} bytes; {n_kept} kept values need {inner_nbytes}") from None
        if len(inner) != inner_nbytes:
            raise CodecError(f"topk body holds {len(inner)} bytes; {n_kept} kept values need {inner_nbytes}")
        return inner, n_kept

    def _inner_nbytes(self, n_kept: int) -> int:
        return (4 << self.bits) + packed_nbytes(n_kept, self.bits) + indices_12bit_nbytes(n_kept)

    def payload_nbytes(self, count: int | Sequence[int]) -> int:
        """Size `encode` produces for a tensor of this shape (an int: a 1-D tensor of that
        many elements); exact unless zstd shrank the payload, which it then bounds."""
        dims = normalize_shape((count,) if isinstance(count, int | np.integer) else count)
        n_kept = chunk_layout(dims, self.chunk, self.tile).kept_total(self.k)
        return HEADER.size + _PREFIX_NBYTES + self._inner_nbytes(n_kept)

    # The base class's hooks see only a flat array; for them the tensor is 1-D.
    def _encode_values(self, values: np.ndarray) -> bytes:
        return self._bodies([values], [(values.size,)])[0]

    def _decode_values(self, body: memoryview, count: int) -> np.ndarray:
        raise NotImplementedError("topk decodes through decode/decode_sparse, which know the shape")

    def _body_nbytes(self, count: int) -> int:
        return self.payload_nbytes(count) - HEADER.size

    def __repr__(self) -> str:
        return (
            f"TopKCodec(k={self.k}, chunk={self.chunk}, tile={self.tile}, bits={self.bits}, "
            f"range_sigmas={self.range_sigmas:g})"
        )
