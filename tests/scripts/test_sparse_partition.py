"""scripts/bench_sparse_partition.py's accounting (scripts/sparse_partition_wire.py): the
chunk-major coordinates match the `topk` codec's chunks, the exact aggregate is SparseLoCo's,
aggregated shards decode to it bit for bit, and the byte counts add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from script_loader import load_script

from shoal.compression import TopKCodec
from shoal.compression.base import HEADER
from shoal.compression.packing import indices_12bit_nbytes, packed_nbytes
from shoal.optim.outer import OuterConfig
from shoal.optim.sparseloco import SparseLoCo, send_with_error_feedback

wire = load_script("sparse_partition_wire")

# ragged 2-D tiles, a multi-chunk 1-D tensor, a vector smaller than k
SHAPES = {"embed": (200, 150), "mlp": (64, 130), "bias": (9000,), "norm": (40,)}


@pytest.fixture(scope="module")
def swarm():
    """Five real SparseLoCo contributions (two rounds of error feedback), correlated Δ_j."""
    codec = TopKCodec()
    generator = torch.Generator().manual_seed(0)
    zeros = {n: torch.zeros(s) for n, s in SHAPES.items()}
    errors = [{n: torch.zeros(s) for n, s in SHAPES.items()} for _ in range(5)]
    for _ in range(2):
        shared = {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}
        payloads = [
            send_with_error_feedback(
                codec,
                error,
                {n: shared[n] + torch.randn(s, generator=generator) for n, s in SHAPES.items()},
                zeros,
                0.95,
            )
            for error in errors
        ]
    grid = wire.chunk_grid(list(SHAPES.values()), codec)
    vectors = []
    for payload in payloads:
        pairs = codec.decode_sparse_many(list(payload.values()), list(SHAPES.values()))
        vectors.append(
            wire.contribution_vector(grid, codec, [(f.numpy(), v.numpy()) for f, v in pairs])
        )
    return codec, grid, payloads, vectors


def test_coordinates_fall_in_the_codecs_chunks(swarm):
    _, grid, _, vectors = swarm
    for vector in vectors:
        assert np.all(np.diff(vector.coords) > 0)  # sorted, unique
        chunk = np.searchsorted(grid.chunk_start, vector.coords, side="right") - 1
        # every chunk holds exactly the min(k, size) entries the codec keeps in it
        assert np.array_equal(np.bincount(chunk, minlength=grid.num_chunks), grid.chunk_kept)


def test_pieces_add_up_to_the_encoded_contribution(swarm):
    codec, grid, payloads, _ = swarm
    whole = sum(len(b) for b in payloads[0].values())
    assert wire.piece_nbytes(grid, codec, 0, grid.num_chunks) == whole
    ranges = wire.owner_ranges(grid, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == grid.num_chunks
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    split = sum(wire.piece_nbytes(grid, codec, lo, hi) for lo, hi in ranges)
    # a tensor cut between owners costs one more header, geometry and value table per cut,
    # and at most a byte of padding each for its codes and its positions
    per_tensor = HEADER.size + 6 + (4 << codec.bits)
    cuts = sum(len(set(grid.chunk_tensor[lo:hi].tolist())) for lo, hi in ranges) - len(SHAPES)
    assert cuts > 0
    assert 0 <= split - whole - cuts * per_tensor <= 2 * cuts


def test_exact_aggregate_is_what_sparseloco_applies(swarm):
    codec, grid, payloads, vectors = swarm
    aggregate = wire.exact_aggregate(vectors)
    outer = SparseLoCo(
        {n: torch.zeros(s) for n, s in SHAPES.items()},
        OuterConfig(name="sparseloco", codec="topk", lr=1.0),
    )
    outer.apply([outer.decode_contribution(p) for p in payloads])
    applied = np.zeros(grid.numel, dtype=np.float32)  # −θ, in chunk-major coordinates
    for t, name in enumerate(SHAPES):
        flat = np.arange(outer.params[name].numel())
        applied[wire.to_coords(grid, codec, t, flat)] = -outer.params[name].view(-1).numpy()
    assert np.count_nonzero(applied) == aggregate.coords.size
    np.testing.assert_allclose(aggregate.dense(grid.numel), applied, rtol=1e-5, atol=1e-7)
    # the norms differ, so the median clip scaled some contribution (the test covers it)
    norms = sorted(v.norm() for v in vectors)
    assert norms[-1] > norms[len(norms) // 2]


def test_shards_decode_to_the_exact_aggregate(swarm):
    _, grid, _, vectors = swarm
    aggregate = wire.exact_aggregate(vectors)
    exact = aggregate.dense(grid.numel)
    for value_bytes in (4, 2):
        joined = np.zeros(grid.numel, dtype=np.float32)
        for lo, hi in wire.owner_ranges(grid, 3):
            part = wire.decode_shard(grid, wire.encode_shard(grid, lo, hi, aggregate, value_bytes))
            assert part.coords.min() >= grid.chunk_start[lo]
            assert part.coords.max() < grid.chunk_start[hi]
            joined[part.coords] = part.values
        if value_bytes == 4:
            assert np.array_equal(joined, exact)  # float32 values: lossless
        else:
            assert np.abs(joined - exact).max() <= np.abs(exact).max() * 2.0**-8  # bfloat16
            assert not np.array_equal(joined, exact)


def test_shard_bytes_follow_the_cheapest_mode_per_chunk():
    codec = TopKCodec()
    grid = wire.chunk_grid([(4 * 4096,)], codec)
    start = grid.chunk_start
    coords = np.concatenate(
        [
            np.arange(4096),  # chunk 0: full -> dense
            start[1] + np.array([5, 70, 4095]),  # chunk 1: 3 entries -> position list
            # chunk 2: empty
            start[3] + np.arange(0, 4000, 4),  # chunk 3: 1000 entries -> bitmap
        ]
    )
    values = np.linspace(-1, 1, coords.size, dtype=np.float32)
    aggregate = wire.SparseVector(coords, values)
    data = wire.encode_shard(grid, 0, 4, aggregate)
    expected = (
        wire.SHARD_HEADER.size
        + packed_nbytes(4, 2)  # modes
        + 2  # the list chunk's count
        + indices_12bit_nbytes(3)
        + 4096 // 8  # the bitmap
        + 4 * (4096 + 3 + 1000)  # values
    )
    assert len(data) == expected
    decoded = wire.decode_shard(grid, data)
    assert np.array_equal(decoded.dense(grid.numel), aggregate.dense(grid.numel))
    corrupted = bytearray(data)
    corrupted[-1] ^= 1
    with pytest.raises(ValueError, match="CRC"):
        wire.decode_shard(grid, bytes(corrupted))


def test_per_peer_download_arithmetic():
    download = wire.per_peer_download([100, 110, 90], [40, 35, 30], [300, 200, 250])
    assert download["gather"] == [200, 190, 210]
    assert download["partition"] == [2 * 40 + 450, 2 * 35 + 550, 2 * 30 + 500]


def test_measure_accounts_gather_and_partition(swarm):
    codec, grid, payloads, _ = swarm
    bench = load_script("bench_sparse_partition")
    envelope = bench.envelope_nbytes(len(payloads))
    assert all(100 < n < 2000 for n in envelope.values())
    row = bench.measure(grid, codec, payloads, envelope)
    peers, contribution = len(payloads), sum(len(b) for b in payloads[0].values())
    download = row["download_bytes_per_peer"]
    assert download["gather"]["mean"] == (peers - 1) * (
        contribution + envelope["/round/contribution"]
    )
    assert (
        download["partition_fp32"]["codec_bytes_mean"]
        > download["partition_bf16"]["codec_bytes_mean"]
        > download["partition_resparsified"]["codec_bytes_mean"]
    )
    assert row["aggregate_fp32_bytes"] > row["union_entries"] * 4
    assert row["relative_error"]["partition_bf16"] < 2.0**-8
    assert 0 < row["relative_error"]["resparsified_topk_exact_values"] < 1
