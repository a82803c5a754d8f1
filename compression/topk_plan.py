"""Where each value of received `topk` payloads goes (`receive_plan`): per kept slot, its
chunk's size, width and origin, and where the packed codes and positions sit once several
payloads' fields are joined, so `TopKCodec` checks and maps a whole model's payloads in one
pass each. A pure function of (layouts, k, bits), cached per model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .packing import segment_slots
from .topk_layout import ChunkLayout


@dataclass(frozen=True)
class ReceivePlan:
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
def receive_plan(layouts: tuple[ChunkLayout, ...], k: int, bits: int) -> ReceivePlan:
    # built only after every payload passed its length checks, so sized by what was
    # received (kept_total(k) >= number of chunks: each keeps >= 1)
    owners = [
        np.repeat(np.arange(layout.num_chunks, dtype=np.int64), np.minimum(layout.chunk_sizes(), k))
        for layout in layouts
    ]
    n_kept = np.array([owner.size for owner in owners], dtype=np.intp)

    def per_slot(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([*arrays, np.empty(0, dtype=np.int64)])

    def per_tensor(values: list[int]) -> np.ndarray:
        return np.repeat(np.array(values, dtype=np.int64), n_kept)

    chunk = per_slot(owners) + per_tensor(
        np.cumsum([0] + [layout.num_chunks for layout in layouts])[:-1].tolist()
    )
    base = per_slot(
        [layout.chunk_origin[owner] for layout, owner in zip(layouts, owners, strict=True)]
    )
    code_nbytes = (n_kept * bits + 7) // 8
    code_slots, code_padding = _padding_slots(n_kept, code_nbytes * (8 // bits))
    index_slots, index_padding = _padding_slots(n_kept, n_kept + n_kept % 2)
    plan = ReceivePlan(
        bounds=np.concatenate(([0], np.cumsum(n_kept))),
        size=per_slot(
            [layout.chunk_sizes()[owner] for layout, owner in zip(layouts, owners, strict=True)]
        ).astype(np.int32),
        width=per_slot(
            [
                layout.heights_widths()[1][owner % layout.grid_cols]
                for layout, owner in zip(layouts, owners, strict=True)
            ]
        ).astype(np.int32),
        base=base,
        dense_base=base
        + per_tensor(
            np.cumsum([0] + [layout.rows * layout.cols for layout in layouts])[:-1].tolist()
        ),
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
