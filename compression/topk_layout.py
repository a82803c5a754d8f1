"""How the `topk` codec (`topk.py`) cuts a tensor into chunks: `chunk_layout`, a pure
function of the tensor shape, so it is never sent.

* a 2-D tensor is cut into `tile` x `tile` blocks (64x64 = 4096 by default), row-major over
  the grid of blocks; the blocks on the bottom and right edges are smaller (ragged);
* any other tensor (scalar, 1-D, 3-D+) is flattened and cut into `chunk`-element chunks,
  the last one ragged.
Every chunk has at most 4096 elements, so a position inside it fits in 12 bits. A chunk of
n elements keeps min(k, n) entries, so the number of kept values follows from the shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from .base import normalize_shape

MAX_CHUNK_ELEMENTS = 4096  # positions are sent in 12 bits


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
