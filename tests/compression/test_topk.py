"""The `topk` codec (SparseLoCo's wire format): which entries it keeps, what they decode to,
its size on the small model, and refusal of every malformed payload."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch

from shoal.compression import (
    CodecError,
    TopKCodec,
    chunk_layout,
    get_codec,
    pack_bits,
    pack_indices_12bit,
)
from shoal.compression.base import HEADER, MAGIC
from shoal.compression.topk import BatchCodecError
from shoal.compression.topk_select import kept_entries, kth_largest_per_row
from shoal.train import build_model

REFERENCE_SHAPES = [(130, 70), (4097,), (3, 5, 7), (1,), (64, 64), (), (200, 3), (2, 9000)]
CRC_AT = HEADER.size - 4
BODY_AT = HEADER.size + 6  # after the geometry fields: the frame flag


def reference_topk(
    tensor: torch.Tensor, k: int = 64, chunk: int = 4096, tile: int = 64
) -> list[int]:
    """Flat indices of the top-k |x| per chunk/tile, chunk by chunk, increasing within a
    chunk: a slow loop written from the spec, independent of the codec's vectorised path."""
    flat_index = torch.arange(tensor.numel()).reshape(tensor.shape)
    if tensor.dim() == 2:
        rows, cols = tensor.shape
        blocks = [
            (tensor[r : r + tile, c : c + tile], flat_index[r : r + tile, c : c + tile])
            for r in range(0, rows, tile)
            for c in range(0, cols, tile)
        ]
    else:
        flat, index = tensor.reshape(-1), flat_index.reshape(-1)
        blocks = [
            (flat[s : s + chunk], index[s : s + chunk]) for s in range(0, flat.numel(), chunk)
        ]
    kept: list[int] = []
    for values, indices in blocks:
        values, indices = values.reshape(-1), indices.reshape(-1)
        order = sorted(range(values.numel()), key=lambda i: -abs(float(values[i])))
        kept += sorted(int(indices[i]) for i in order[: min(k, values.numel())])
    return kept


def reseal(data: bytes | bytearray) -> bytes:
    """Recompute the CRC, as a peer that means harm would."""
    data = bytearray(data)
    crc = zlib.crc32(bytes(data[HEADER.size :]), zlib.crc32(bytes(data[:CRC_AT])))
    data[CRC_AT : HEADER.size] = struct.pack("<I", crc)
    return bytes(data)


def forge(
    shape, positions, codes=None, table=(-1.0, -0.5, 0.5, 1.0), geometry=(64, 4096, 64, 2)
) -> bytes:
    """A stored (not zstd) topk payload with a valid CRC, from its parts."""
    positions = np.asarray(positions, dtype=np.int64)
    codes = (
        np.zeros(positions.size, dtype=np.uint8)
        if codes is None
        else np.asarray(codes, dtype=np.uint8)
    )
    inner = (
        np.asarray(table, dtype="<f4").tobytes()
        + pack_bits(codes, 2)
        + pack_indices_12bit(positions)
    )
    body = struct.pack("<HHBB", *geometry) + b"\0" + inner
    return reseal(HEADER.pack(MAGIC, TopKCodec.codec_id, 1, math.prod(shape), 0) + body)


def honest_positions(shape) -> np.ndarray:
    """In-chunk positions 0..k_eff-1 of every chunk: a valid position list for `shape`."""
    sizes = chunk_layout(shape).chunk_sizes()
    return np.concatenate([np.arange(min(64, int(n))) for n in sizes])


@pytest.mark.parametrize("shape", REFERENCE_SHAPES, ids=str)
def test_keeps_exactly_the_top_k_per_chunk(shape) -> None:
    codec = TopKCodec()
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape) + len(shape)))
    expected = reference_topk(tensor)
    indices, values = codec.topk_select(tensor)
    assert indices.dtype == torch.int64 and values.dtype == torch.float32
    assert indices.tolist() == expected
    assert torch.equal(values, tensor.reshape(-1)[indices])
    payload = codec.encode(tensor)
    assert len(payload) <= codec.payload_nbytes(shape)
    sent, decoded = codec.decode_sparse(payload, shape)
    assert sent.tolist() == expected
    dense = codec.decode(payload, shape)
    assert dense.shape == torch.Size(shape) and dense.dtype == torch.float32
    mask = torch.zeros(tensor.numel(), dtype=torch.bool)
    mask[sent] = True
    assert torch.equal(dense.reshape(-1)[sent], decoded)
    assert not dense.reshape(-1)[~mask].any()


@pytest.mark.parametrize("shape", [(130, 70), (9000,)], ids=str)
def test_ties_keep_exactly_k_lowest_positions_first(shape) -> None:
    # the reference's stable sort keeps the lowest positions among equal magnitudes
    codec = TopKCodec()
    small_ints = torch.randint(-2, 3, shape, generator=torch.Generator().manual_seed(4)).float()
    for tensor in (small_ints, torch.zeros(shape)):
        indices, _ = codec.topk_select(tensor)
        assert indices.tolist() == reference_topk(tensor)
        assert codec.decode_sparse(codec.encode(tensor), shape)[0].tolist() == reference_topk(
            tensor
        )


def test_decoded_values_are_bin_means() -> None:
    codec = TopKCodec()
    tensor = torch.randn(300, 200, generator=torch.Generator().manual_seed(1))
    _, kept = codec.topk_select(tensor)
    _, decoded = codec.decode_sparse(codec.encode(tensor), tensor.shape)
    levels = decoded.unique()
    assert 2 <= levels.numel() <= 4
    for level in levels:  # each decoded level is the mean of the original values sent to it
        assert float(kept[decoded == level].mean()) == pytest.approx(float(level), rel=1e-5)
    assert float(decoded.double().sum()) == pytest.approx(
        float(kept.double().sum()), rel=1e-4
    )  # unbiased


def test_small_model_bits_per_parameter() -> None:
    codec = get_codec("topk")
    model = build_model("small", seed=0)
    generator = torch.Generator().manual_seed(0)
    bits = params = 0
    for param in model.parameters():
        payload = codec.encode(torch.randn(param.shape, generator=generator))
        assert len(payload) <= codec.payload_nbytes(param.shape)
        bits += 8 * len(payload)
        params += param.numel()
    # 64/4096 kept x (12 + 2) bits = 0.219, plus headers, geometry, tables and the 1-D
    # norm weights (64 of 128 kept)
    assert bits / params <= 0.25


def test_zstd_frame_when_it_helps_and_exact() -> None:
    # 257 columns: the last tile column is 1 wide, so all 64 of its entries are kept and
    # their positions 0..63 compress
    codec = TopKCodec()
    tensor = torch.randn(300, 257, generator=torch.Generator().manual_seed(2))
    payload = codec.encode(tensor)
    assert payload[BODY_AT] == 1 and len(payload) < codec.payload_nbytes(tensor.shape)
    sent, _ = codec.decode_sparse(payload, tensor.shape)
    assert sent.tolist() == reference_topk(tensor)


def test_forged_payload_round_trip_and_options() -> None:
    shape = (130, 70)
    positions = honest_positions(shape)
    sent, values = TopKCodec().decode_sparse(forge(shape, positions), shape)
    assert sent.numel() == positions.size and (values == -1.0).all()
    with pytest.raises(ValueError, match="tile"):
        TopKCodec(tile=65)
    with pytest.raises(ValueError, match="chunk"):
        TopKCodec(chunk=4097)
    for bad in (3, 2.0, True):
        with pytest.raises(ValueError, match="bits"):
            TopKCodec(bits=bad)
    assert TopKCodec().payload_nbytes(np.int64(4097)) == TopKCodec().payload_nbytes((4097,))


@pytest.mark.parametrize("shape", [(130, 70), (9000,)], ids=str)
def test_duplicate_unordered_and_out_of_range_positions(shape) -> None:
    codec, good = TopKCodec(), honest_positions(shape)
    sizes = chunk_layout(shape).chunk_sizes()
    duplicate = good.copy()
    duplicate[5] = duplicate[4]
    with pytest.raises(CodecError, match="strictly increasing"):
        codec.decode_sparse(forge(shape, duplicate), shape)
    swapped = good.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    with pytest.raises(CodecError, match="strictly increasing"):
        codec.decode(forge(shape, swapped), shape)
    outside = good.copy()
    outside[64 + 63] = sizes[1]  # one past the end of the second (ragged or full) chunk
    if sizes[1] < 4096:
        with pytest.raises(CodecError, match="outside chunk 1"):
            codec.decode(forge(shape, outside), shape)
    last = good.copy()
    last[-1] = sizes[-1]  # one past the end of the ragged last chunk
    with pytest.raises(CodecError, match="outside"):
        codec.decode_sparse(forge(shape, last), shape)


def test_bad_table_geometry_and_lengths() -> None:
    shape, codec = (130, 70), TopKCodec()
    positions = honest_positions(shape)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CodecError, match="non-finite"):
            codec.decode(forge(shape, positions, table=(0.0, bad, 1.0, 2.0)), shape)
    with pytest.raises(CodecError, match="k=32"):
        codec.decode(forge(shape, positions, geometry=(32, 4096, 64, 2)), shape)
    with pytest.raises(CodecError, match="k=32"):
        codec.decode(TopKCodec(k=32).encode(torch.randn(shape)), shape)
    with pytest.raises(CodecError, match="need"):
        codec.decode(forge(shape, positions[:-1]), shape)
    with pytest.raises(CodecError, match="need"):
        codec.decode(forge(shape, np.concatenate((positions, [0, 1]))), shape)


def test_byte_flips_truncation_garbage_and_wrong_shape() -> None:
    codec = TopKCodec()
    shape = (130, 70)
    payload = codec.encode(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    rng = np.random.default_rng(0)
    for offset in range(len(payload)):  # every byte: the CRC catches it
        corrupt = bytearray(payload)
        corrupt[offset] ^= int(rng.integers(1, 256))
        with pytest.raises(CodecError):
            codec.decode(bytes(corrupt), shape)
    for cut in range(len(payload)):
        for candidate in (
            payload[:cut],
            reseal(payload[:cut]) if cut >= HEADER.size else payload[:cut],
        ):
            with pytest.raises(CodecError):
                codec.decode_sparse(candidate, shape)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode(reseal(payload + b"\0"), shape)
    # resealed flips in the body: another valid tensor at worst, never a crash
    for offset in range(HEADER.size, len(payload)):
        corrupt = bytearray(payload)
        corrupt[offset] ^= int(rng.integers(1, 256))
        try:
            dense = codec.decode(reseal(corrupt), shape)
        except CodecError:
            continue
        assert dense.shape == shape and torch.isfinite(dense).all()
    for length in [0, 3, HEADER.size, 50, 400, 10_000]:
        garbage = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        with pytest.raises(CodecError):
            codec.decode(garbage, shape)
        forged = HEADER.pack(MAGIC, TopKCodec.codec_id, 1, math.prod(shape), 0) + garbage
        with pytest.raises(CodecError):
            codec.decode(reseal(forged), shape)
    for wrong in [(70, 131), (131, 70), (9101,), (2**40,)]:
        with pytest.raises(CodecError):
            codec.decode(payload, wrong)
    # same element count, other geometry: (9100,) keeps 192 values, (130, 70) keeps 332
    with pytest.raises(CodecError, match="need"):
        codec.decode(payload, (9100,))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_refused(bad: float) -> None:
    tensor = torch.randn(64, 64)
    tensor[3, 7] = bad
    codec = TopKCodec()
    with pytest.raises(CodecError, match="NaN/Inf"):
        codec.encode(tensor)
    with pytest.raises(CodecError, match="NaN/Inf"):
        codec.topk_select(tensor)


@pytest.mark.parametrize("kind", ["normal", "ties", "zero_rows", "padded"])
def test_kth_largest_per_row_matches_a_full_partition(kind):
    """The two-pass selection is exact: same k-th largest as one np.partition, on random
    widths and k, with ties, all-zero rows (every entry a candidate) and -1 padding."""
    rng = np.random.default_rng(hash(kind) % 2**32)
    for _ in range(60):
        width = int(rng.integers(1, 5000))
        n_rows = int(rng.integers(0, 30))
        k = int(rng.integers(1, min(width, 200) + 1))
        rows = rng.standard_normal((n_rows, width)).astype(np.float32)
        if kind == "ties":
            rows = np.round(rows * 2) / 2
        elif kind == "zero_rows":
            rows[: n_rows // 2] = 0
        elif kind == "padded":
            rows = np.abs(rows)
            rows[:, width // 2 :] = -1
        expected = np.partition(rows, width - k, axis=1)[:, width - k]
        np.testing.assert_array_equal(kth_largest_per_row(rows, k), expected)


def pseudo_random(shape, seed: int) -> torch.Tensor:
    """Deterministic float32 values from integer hashing alone (no RNG whose stream a
    library update could change), cubed for heavy tails."""
    i = np.arange(math.prod(shape), dtype=np.uint64) + np.uint64(seed * 1_000_003)
    h = (i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(1274126177) % np.uint64(2**32)
    x = h.astype(np.float64) / 2**32 - 0.5
    return torch.from_numpy((x * x * x).astype(np.float32).reshape(shape))


MODEL_SHAPES = [
    (130, 70),
    (4097,),
    (3, 5, 7),
    (1,),
    (64, 64),
    (),
    (0,),
    (200, 3),
    (128,),
    (384, 128),
]
# sha256 of encode_many(MODEL_SHAPES inputs) as produced by the per-tensor implementation
# that preceded the batched one: the wire bytes must not change with the implementation
WIRE_SHA256 = "6e59b2c1ff5891c6069d70cc133fc704a52b39107030649f1bd507398631402b"


def test_wire_bytes_are_pinned() -> None:
    import hashlib

    payloads = TopKCodec().encode_many(
        [pseudo_random(shape, i) for i, shape in enumerate(MODEL_SHAPES)]
    )
    assert all(payload[BODY_AT] == 0 for payload in payloads)  # stored: no zstd version in the hash
    assert hashlib.sha256(b"".join(payloads)).hexdigest() == WIRE_SHA256


@pytest.mark.parametrize(
    "options", [{}, {"k": 3, "bits": 1}, {"k": 100, "chunk": 333, "tile": 10, "bits": 4}], ids=str
)
def test_batched_encode_and_decode_match_one_tensor_at_a_time(options) -> None:
    # {"chunk": 333, "tile": 10}: 2-D and other tensors have different chunk widths, so
    # the batch is stacked in two matrices and put back in tensor order
    codec = TopKCodec(**options)
    generator = torch.Generator().manual_seed(5)
    tensors = [torch.randn(shape, generator=generator) for shape in MODEL_SHAPES]
    tensors += [
        torch.randint(-2, 3, (150, 90), generator=generator).float(),
        torch.zeros(70, 70),
        torch.randn(300, 257),
    ]
    shapes = [tuple(t.shape) for t in tensors]
    payloads = codec.encode_many(tensors)
    assert payloads == [codec.encode(t) for t in tensors]
    for dense, payload, shape in zip(
        codec.decode_many(payloads, shapes), payloads, shapes, strict=True
    ):
        assert dense.shape == shape and torch.equal(dense, codec.decode(payload, shape))
    for (flat, values), payload, shape in zip(
        codec.decode_sparse_many(payloads, shapes), payloads, shapes, strict=True
    ):
        alone_flat, alone_values = codec.decode_sparse(payload, shape)
        assert (
            flat.dtype == torch.int64
            and torch.equal(flat, alone_flat)
            and torch.equal(values, alone_values)
        )


@pytest.mark.parametrize("batch_rows", [1, 7, 100])
def test_selection_in_small_batches_changes_nothing(monkeypatch, batch_rows) -> None:
    # the rows are selected a batch at a time; batches that cut tensors anywhere (a flat
    # tensor mid-way, a tiled one at grid rows, one grid row wider than the batch) and
    # join small ones must give the bytes of one batch holding everything
    from shoal.compression import topk_select

    generator = torch.Generator().manual_seed(7)
    tensors = [pseudo_random(shape, i) for i, shape in enumerate(MODEL_SHAPES)]
    tensors += [
        torch.randn(shape, generator=generator)
        for shape in [(130, 1000), (30 * 4096 + 5,), (700, 200), (5, 5)]
    ]
    codec = TopKCodec()
    monkeypatch.setattr(topk_select, "_BATCH_ROWS", 1 << 30)
    whole = codec.encode_many(tensors)
    monkeypatch.setattr(topk_select, "_BATCH_ROWS", batch_rows)
    assert codec.encode_many(tensors) == whole
    bad = tensors[-2].clone()
    bad[-1] = float("nan")  # in the last batch
    with pytest.raises(CodecError, match="NaN"):
        codec.encode_many([*tensors[:-2], bad])


def test_encode_many_raises_what_the_first_bad_tensor_raises() -> None:
    codec, good = TopKCodec(), torch.randn(70, 70)
    nan, ints = torch.randn(8, 8), torch.ones(3, dtype=torch.int64)
    nan[1, 1] = float("nan")
    with pytest.raises(CodecError, match="NaN/Inf"):
        codec.encode_many([good, nan, ints])
    with pytest.raises(CodecError, match="floating-point"):
        codec.encode_many([good, ints, nan])
    with pytest.raises(CodecError, match="NaN/Inf"):  # beyond float32 range: Inf after the cast
        codec.encode_many([good, torch.full((5000,), 1e300, dtype=torch.float64)])


def test_decode_many_names_the_first_payload_that_fails_alone() -> None:
    codec, shape = TopKCodec(), (130, 70)
    good = codec.encode(torch.randn(shape))
    duplicate = honest_positions(shape)
    duplicate[5] = duplicate[4]
    unordered, nan_table = (
        forge(shape, duplicate),
        forge(shape, honest_positions(shape), table=(0.0, float("nan"), 1.0, 2.0)),
    )
    with pytest.raises(CodecError) as alone:
        codec.decode_sparse(unordered, shape)
    # index 3 fails a later check than index 4 does; one at a time, 3 fails first
    batch = [good, good, good, unordered, nan_table]
    for decode in (codec.decode_many, codec.decode_sparse_many):
        with pytest.raises(BatchCodecError) as caught:
            decode(batch, [shape] * 5)
        assert caught.value.index == 3 and str(caught.value) == str(alone.value)
    with pytest.raises(BatchCodecError, match="payload holds") as caught:
        codec.decode_many([good, good], [shape, (4097,)])
    assert caught.value.index == 1
    with pytest.raises(ValueError, match="shapes"):
        codec.decode_many([good], [shape, shape])


def test_kept_entries_match_a_stable_sort() -> None:
    """Per row, the quota largest (ties: lowest positions first), -1 padding never kept:
    on random widths, k and quotas, with ties, zero rows, heavy tails and padding anywhere."""
    rng = np.random.default_rng(11)
    for trial in range(300):
        width = int(rng.choice([64, 100, 4096, int(rng.integers(1, 5000))]))
        n_rows, k = int(rng.integers(0, 30)), int(rng.integers(1, min(width, 300) + 1))
        rows = np.abs(rng.standard_normal((n_rows, width))).astype(np.float32)
        kind = trial % 4
        if kind == 1:
            rows = np.round(rows * 2) / 2
        elif kind == 2:
            rows[: n_rows // 2] = 0
        elif kind == 3:
            rows = rows**6 * rng.choice([1e-3, 1.0, 1e3], size=(1, width)).astype(np.float32)
        sizes = rng.integers(1, width + 1, n_rows) if rng.random() < 0.5 else np.full(n_rows, width)
        for r in range(n_rows):
            rows[r, rng.permutation(width)[: width - sizes[r]]] = -1
        quota = np.minimum(sizes, k)
        expected = [
            r * width + i
            for r in range(n_rows)
            for i in sorted(np.argsort(-rows[r], kind="stable")[: quota[r]])
        ]
        assert kept_entries(rows, k, quota).tolist() == expected
