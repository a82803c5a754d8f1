"""Top-k selection for the `topk` codec (`topk.py`): which entries of each chunk it keeps.

The chunks of a batch of tensors (`select_many`) are written as |x| into the rows of one
float32 matrix per chunk width (`write_blocks`; ragged chunks padded with -1, never kept),
and each row keeps its quota min(k, chunk size) largest entries.

The threshold is each row's exact k-th largest, found in two passes (`_candidates`):
pass 1 takes every 9th entry of the row and its ceil(2k/9)-th largest as a floor, so about
2k entries of the row (the candidates) are at or above it; pass 2 finds the k-th largest of
the candidates alone, in a matrix about 2k wide instead of the chunk's 4096. A row with
fewer than k candidates or more than 4k (ties at the floor) falls back to one full
partition, so the result is exact in every case.

Tie rule (`kept_entries`): a row keeps every entry above its threshold and, of those equal
to it, the lowest positions, up to its quota; the threshold is never below 0, so a short
chunk keeps all its entries and padding is never kept. A row whose k-th largest is not
tied keeps exactly its candidates at or above it; tied and fallback rows are redone on
their full width (`_keep_rows`). The kept entries come out row-major, which is wire order
(chunk by chunk, positions increasing within a chunk).

Scratch matrices come from per-thread buffers (`_workspace`), and the per-model mapping
from rows back to tensors is cached (`_send_plan`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .base import CodecError
from .topk_layout import ChunkLayout

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
    is_candidate = np.greater_equal(
        rows, floor[:, None], out=_workspace("candidate", rows.size, np.bool_).reshape(rows.shape)
    )
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
        slot = np.arange(flat.size, dtype=np.int64) + np.repeat(
            compact * max_count - starts, counts
        )
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
    redone_row, column = np.divmod(
        np.flatnonzero(_keep_rows(blocks[redone], threshold[redone], quota[redone])), width
    )
    return np.sort(np.concatenate((found.flat[is_kept], redone[redone_row] * width + column)))


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
        chunk_cols=np.concatenate(
            [np.tile(layout.heights_widths()[1], layout.grid_rows) for layout in layouts]
        ),
        cols=per_tensor([layout.cols for layout in layouts]),
        origin=np.concatenate([layout.chunk_origin for layout in layouts]),
    )


def write_blocks(values: np.ndarray, layout: ChunkLayout, out: np.ndarray) -> None:
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


# Rows of |x| selected per batch: 256 rows of 4096 are 4 MiB of float32, which stays in
# the last-level cache, where one matrix of a whole model would be written and read back
# from memory (and, the first time, page-faulted in: 1 s for a 50M-parameter tensor).
_BATCH_ROWS = 256


def _band(
    values: np.ndarray, layout: ChunkLayout, first: int, end: int
) -> tuple[np.ndarray, ChunkLayout]:
    """Chunks first:end of a tensor as a tensor of their own: a contiguous slice of its
    flat values and the layout of that slice (for a tiled tensor, whole grid rows)."""
    if layout.tile_rows == 1:
        begin = first * layout.tile_cols
        piece = values[begin : min(end * layout.tile_cols, layout.cols)]
        return piece, type(layout)(1, piece.size, 1, layout.tile_cols)
    top, bottom = (
        first // layout.grid_cols * layout.tile_rows,
        min(end // layout.grid_cols * layout.tile_rows, layout.rows),
    )
    return values[top * layout.cols : bottom * layout.cols], type(layout)(
        bottom - top, layout.cols, layout.tile_rows, layout.tile_cols
    )


def _batches(
    layouts: Sequence[ChunkLayout], members: list[int]
) -> list[list[tuple[int, int, int]]]:
    """The chunks of `members` (in order) cut into batches of about `_BATCH_ROWS` rows,
    each a list of (tensor, first chunk, end chunk); a tiled tensor is cut at grid rows."""
    batches: list[list[tuple[int, int, int]]] = [[]]
    rows = 0
    for i in members:
        layout = layouts[i]
        unit = 1 if layout.tile_rows == 1 else layout.grid_cols
        step = max(unit, _BATCH_ROWS // unit * unit)
        for first in range(0, layout.num_chunks, step):
            end = min(first + step, layout.num_chunks)
            batches[-1].append((i, first, end))
            rows += end - first
            if rows >= _BATCH_ROWS:
                batches.append([])
                rows = 0
    return [batch for batch in batches if batch]


def select_many(
    values: Sequence[np.ndarray], layouts: Sequence[ChunkLayout], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept entries of several tensors, back to back in tensor order: (flat indices
    into their tensor, in-chunk positions), both int64 in chunk order with positions
    increasing within a chunk, and per tensor how many.

    The chunks of all tensors are stacked as the rows of one matrix per chunk width,
    selected a batch of rows at a time (small tensors share a batch, large ones are cut),
    so thresholds, ties, the row-major scan (which yields wire order) and the mapping back
    to tensors each run a few times per model rather than once per tensor."""
    lengths = np.zeros(len(values), dtype=np.intp)
    by_width: dict[int, list[int]] = {}
    for i, layout in enumerate(layouts):
        if layout.num_chunks:
            by_width.setdefault(layout.tile_rows * layout.tile_cols, []).append(i)
    groups = []
    for width, members in by_width.items():
        plan = _send_plan(tuple(layouts[i] for i in members), k)
        parts, first_row = [], 0
        for batch in _batches(layouts, members):
            n_rows = sum(end - first for _, first, end in batch)
            # a reused per-thread buffer: a fresh one costs more in page faults than the copy
            blocks = _workspace("blocks", n_rows * width, np.float32).reshape(n_rows, width)
            row = 0
            for i, first, end in batch:
                write_blocks(
                    *_band(values[i], layouts[i], first, end), blocks[row : row + end - first]
                )
                row += end - first
            if not math.isfinite(blocks.max()):  # NaN and Inf survive abs and max
                raise CodecError("tensor holds NaN/Inf value(s) (or values beyond float32 range)")
            parts.append(
                kept_entries(blocks, k, plan.quota[first_row : first_row + n_rows])
                + first_row * width
            )
            first_row += n_rows
        kept = np.concatenate(parts)
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
        for i, start, end in zip(
            members, (ends - lengths[members]).tolist(), ends.tolist(), strict=True
        ):
            pieces[i] = flat[start:end], positions[start:end]
    ordered = [pieces[i] for i in sorted(pieces)]
    return (
        np.concatenate([flat for flat, _ in ordered] + [np.empty(0, np.int64)]),
        np.concatenate([positions for _, positions in ordered] + [np.empty(0, np.int64)]),
        lengths,
    )
