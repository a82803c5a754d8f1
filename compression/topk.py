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

Which entries a chunk keeps (the exact k-th largest |x| per chunk and the tie rule) is
`topk_select.py`, the chunking `topk_layout.py`, and where received values go
`topk_plan.py`; this file is the codec and the wire format.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np
import torch

from .base import HEADER, MAGIC, Codec, CodecError, as_float32_values, normalize_shape, seal
from .framing import FrameTooLarge, zstd_frame, zstd_unframe
from .packing import (
    indices_12bit_nbytes,
    pack_bits_many,
    pack_indices_12bit_many,
    packed_nbytes,
    unpack_bits,
    unpack_indices_12bit,
)
from .quantize import quantize_segments
from .topk_layout import MAX_CHUNK_ELEMENTS, ChunkLayout, chunk_layout
from .topk_plan import ReceivePlan, receive_plan
from .topk_select import select_many

__all__ = ["MAX_CHUNK_ELEMENTS", "BatchCodecError", "ChunkLayout", "TopKCodec", "chunk_layout"]


_GEOMETRY = struct.Struct("<HHBB")  # k, chunk, tile, bits
_PREFIX_NBYTES = _GEOMETRY.size + 1  # geometry + frame flag


def _float32_values(tensor: torch.Tensor) -> np.ndarray:
    """`as_float32_values` less its finiteness check, which `select_many` makes once for
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
    sparse = True  # averaging is not elementwise on the wire: no reduce-scatter (peer.reduce)

    def __init__(
        self,
        *,
        k: int = 64,
        chunk: int = 4096,
        tile: int = 64,
        bits: int = 2,
        range_sigmas: float = 6.0,
    ) -> None:
        self.k = _check_int("k", k, 1, MAX_CHUNK_ELEMENTS)
        self.chunk = _check_int("chunk", chunk, 1, MAX_CHUNK_ELEMENTS)
        self.tile = _check_int("tile", tile, 1, math.isqrt(MAX_CHUNK_ELEMENTS))
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (1, 2, 4, 8):
            raise ValueError(f"topk: bits must be one of 1, 2, 4, 8, got {bits!r}")
        self.bits = bits
        if isinstance(range_sigmas, bool) or not (
            isinstance(range_sigmas, int | float)
            and math.isfinite(range_sigmas)
            and range_sigmas > 0
        ):
            raise ValueError(
                f"topk: range_sigmas must be a positive finite number, got {range_sigmas!r}"
            )
        self.range_sigmas = float(range_sigmas)

    # -- selection (topk_select.py) --------------------------------------------------

    def topk_select(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices int64, values float32) of the entries `encode` keeps, chunk by
        chunk, positions increasing within a chunk; values are the exact (unquantized) ones.
        CodecError for non-float or non-finite tensors."""
        values = as_float32_values(tensor)
        flat, _, _ = select_many(
            [values], [chunk_layout(tuple(tensor.shape), self.chunk, self.tile)], self.k
        )
        return torch.from_numpy(flat), torch.from_numpy(values[flat])

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
        return [
            seal(HEADER, (MAGIC, self.codec_id, self.version, value.size), body)
            for value, body in zip(values, bodies, strict=True)
        ]

    def _bodies(
        self, values: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]
    ) -> list[bytes]:
        flat, positions, lengths = select_many(
            values, [chunk_layout(shape, self.chunk, self.tile) for shape in shapes], self.k
        )
        ends = np.cumsum(lengths)
        kept = np.empty(flat.size, dtype=np.float32)
        for value, start, end in zip(values, (ends - lengths).tolist(), ends.tolist(), strict=True):
            np.take(
                value, flat[start:end], out=kept[start:end], mode="clip"
            )  # in range by construction
        nonempty = lengths > 0
        tables = np.zeros((len(values), 1 << self.bits), dtype=np.float32)
        codes = np.empty(0, dtype=np.uint8)
        if nonempty.any():
            tables[nonempty], codes = quantize_segments(
                kept, lengths[nonempty], self.bits, self.range_sigmas
            )
        table_bytes, table_nbytes = memoryview(tables.astype("<f4").tobytes()), 4 << self.bits
        code_fields = pack_bits_many(codes, lengths, self.bits)  # quantizer output: in range
        index_fields = pack_indices_12bit_many(
            positions, lengths
        )  # in-chunk positions: < 4096 by layout
        geometry = _GEOMETRY.pack(self.k, self.chunk, self.tile, self.bits)
        return [
            geometry
            + zstd_frame(
                b"".join(
                    (
                        table_bytes[i * table_nbytes : (i + 1) * table_nbytes],
                        code_field,
                        index_field,
                    )
                )
            )
            for i, (code_field, index_field) in enumerate(
                zip(code_fields, index_fields, strict=True)
            )
        ]

    def decode(self, payload: bytes, shape: Sequence[int]) -> torch.Tensor:
        """A dense float32 CPU tensor of `shape`: zeros except the sent entries; CodecError
        for anything malformed."""
        dims = normalize_shape(shape)
        flat, values, _ = self._decode_joined([payload], [dims], dense=False)
        dense = np.zeros(math.prod(dims), dtype=np.float32)
        dense[flat] = values
        return torch.from_numpy(dense).reshape(dims)

    def decode_sparse(
        self, payload: bytes, shape: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat indices int64, values float32) a peer sent for a tensor of `shape`, in
        chunk order, with all of decode's validation. A sent value may be 0."""
        flat, values, _ = self._decode_joined([payload], [normalize_shape(shape)], dense=False)
        return torch.from_numpy(flat), torch.from_numpy(values)

    def decode_many(
        self, payloads: Sequence[bytes], shapes: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """`decode` of several payloads (a contribution, tensor by tensor) in one batch;
        BatchCodecError names the first payload that fails. The tensors are views of one
        buffer: a fresh allocation per tensor costs more in page faults than the decode."""
        dims = [normalize_shape(shape) for shape in shapes]
        flat, values, _ = self._decode_batch(payloads, dims, dense=True)
        counts = [math.prod(shape) for shape in dims]
        dense = np.zeros(sum(counts), dtype=np.float32)  # calloc: pages zeroed as touched
        dense[flat] = values
        return [
            part.view(shape)
            for part, shape in zip(torch.from_numpy(dense).split(counts), dims, strict=True)
        ]

    def decode_sparse_many(
        self, payloads: Sequence[bytes], shapes: Sequence[Sequence[int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`decode_sparse` of several payloads in one batch (views of two shared arrays);
        BatchCodecError names the first payload that fails."""
        flat, values, bounds = self._decode_batch(
            payloads, [normalize_shape(shape) for shape in shapes], dense=False
        )
        flat_tensor, value_tensor = torch.from_numpy(flat), torch.from_numpy(values)
        return [
            (flat_tensor[start:end], value_tensor[start:end])
            for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        ]

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
        plan = receive_plan(layouts, self.k, self.bits)
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
        positions = (positions if plan.index_slots is None else positions[plan.index_slots]).astype(
            np.int32
        )
        outside = positions >= plan.size
        if outside.any():
            raise CodecError(
                self._outside_message(layouts, plan, positions, int(np.argmax(outside)))
            )
        if (plan.same_chunk & (positions[1:] <= positions[:-1])).any():
            raise CodecError(
                "topk positions within a chunk must be strictly increasing (duplicate or unordered)"
            )
        row_in, col_in = np.divmod(positions, plan.width)
        flat = (plan.dense_base if dense else plan.base) + row_in * plan.cols + col_in
        return (
            flat,
            np.take(table, plan.table_key + codes, mode="clip"),
            plan.bounds,
        )  # keys < table.size

    def _outside_message(
        self, layouts: tuple[ChunkLayout, ...], plan: ReceivePlan, positions: np.ndarray, at: int
    ) -> str:
        tensor = int(np.searchsorted(plan.bounds, at, side="right")) - 1
        slot = at - int(plan.bounds[tensor])
        chunk = int(
            np.searchsorted(
                np.cumsum(np.minimum(layouts[tensor].chunk_sizes(), self.k)), slot, side="right"
            )
        )
        return (
            f"topk position {int(positions[at])} lies outside chunk {chunk} "
            f"of {int(plan.size[at])} elements"
        )

    def _inner(
        self, payload: bytes, dims: tuple[int, ...], layout: ChunkLayout
    ) -> tuple[bytes, int]:
        """The inner part of a payload for a tensor of `dims` (header, CRC, geometry, frame
        and length checked), and how many values it holds."""
        body = self._read_header(payload, math.prod(dims))
        n_kept = layout.kept_total(self.k)
        inner_nbytes = self._inner_nbytes(n_kept)
        if len(body) < _PREFIX_NBYTES:
            raise CodecError(
                f"topk body is {len(body)} bytes; its geometry and frame flag need {_PREFIX_NBYTES}"
            )
        geometry = _GEOMETRY.unpack_from(body)
        if geometry != (self.k, self.chunk, self.tile, self.bits):
            raise CodecError(
                "topk payload was encoded with k={}, chunk={}, tile={}, bits={}; this receiver "
                "needs k={}, chunk={}, tile={}, bits={}".format(
                    *geometry, self.k, self.chunk, self.tile, self.bits
                )
            )
        try:
            inner = zstd_unframe(body[_GEOMETRY.size :], max_size=inner_nbytes)
        except FrameTooLarge as exc:
            raise CodecError(
                f"topk body holds {exc.size} bytes; {n_kept} kept values need {inner_nbytes}"
            ) from None
        if len(inner) != inner_nbytes:
            raise CodecError(
                f"topk body holds {len(inner)} bytes; {n_kept} kept values need {inner_nbytes}"
            )
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
