"""The per-bin-mean quantizers (int8, q4, q2): error, bias, sizes, degenerate chunks."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import torch

from shoal.compression import dequantize_chunks, get_codec, quantize_chunks

QUANTIZERS = ["int8", "q4", "q2"]


def rel_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    return float((decoded - original).norm() / original.norm())


def test_error_bounds_on_gaussian_data() -> None:
    original = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name in QUANTIZERS:
        codec = get_codec(name)
        errors[name] = rel_error(codec.decode(codec.encode(original), original.shape), original)
    # bin width 12σ/2**bits; per-bin means do a little better than w/√12 inside the bulk
    assert errors["int8"] < 0.015
    assert errors["q4"] < 0.23
    assert errors["q2"] < 0.62
    assert errors["int8"] < errors["q4"] < errors["q2"]


@pytest.mark.parametrize(
    ("name", "low", "high"), [("int8", 3.8, 4.05), ("q4", 7.6, 8.05), ("q2", 15.0, 16.05)]
)
def test_wire_size_vs_fp32(name: str, low: float, high: float) -> None:
    original = torch.randn(1_000_000)
    fp32 = get_codec("fp32")
    codec = get_codec(name)
    ratio = fp32.nbytes(fp32.encode(original)) / codec.nbytes(codec.encode(original))
    assert low <= ratio <= high


@pytest.mark.parametrize("name", QUANTIZERS)
def test_decode_is_unbiased_per_chunk(name: str) -> None:
    """Per-bin means keep every chunk's sum: a skewed, heavy-tailed chunk (where bin
    centres would be biased) decodes to the same mean. Includes a ragged tail chunk."""
    rng = np.random.default_rng(1)
    chunk_size = 4096
    values = (rng.lognormal(0.0, 1.5, 5 * chunk_size + 777) - 1.0).astype(np.float32)
    values[100] = 500.0  # an outlier beyond +6σ lands in the top bin, not clipped away
    codec = get_codec(name, chunk_size=chunk_size)
    decoded = codec.decode(codec.encode(torch.from_numpy(values)), values.shape).numpy()
    for start in range(0, values.size, chunk_size):
        chunk, got = values[start : start + chunk_size], decoded[start : start + chunk_size]
        expected_mean = chunk.astype(np.float64).mean()
        assert abs(got.astype(np.float64).mean() - expected_mean) <= 1e-6 * np.abs(chunk).max()


def test_statistics_are_per_chunk() -> None:
    """Chunks of very different scale each keep int8 accuracy (global stats would not)."""
    rng = np.random.default_rng(2)
    scales = [1e-6, 1.0, 1e4, 1e-2]
    values = np.concatenate([rng.standard_normal(1000) * s for s in scales]).astype(np.float32)
    codec = get_codec("int8", chunk_size=1000)
    decoded = codec.decode(codec.encode(torch.from_numpy(values)), (4000,))
    for i in range(len(scales)):
        part = slice(i * 1000, (i + 1) * 1000)
        assert rel_error(decoded[part], torch.from_numpy(values[part])) < 0.02


@pytest.mark.parametrize("name", QUANTIZERS)
def test_zero_variance_chunks_round_trip_exactly(name: str) -> None:
    chunk_size = 1024
    values = np.concatenate(
        [
            np.full(chunk_size, 0.1234567, dtype=np.float32),
            np.zeros(chunk_size, dtype=np.float32),
            np.random.default_rng(3).standard_normal(chunk_size).astype(np.float32),
            np.full(chunk_size, -3.0e30, dtype=np.float32),
            np.full(100, 7.5e-39, dtype=np.float32),  # subnormal tail chunk
        ]
    )
    codec = get_codec(name, chunk_size=chunk_size)
    decoded = codec.decode(codec.encode(torch.from_numpy(values)), values.shape).numpy()
    for start in (0, chunk_size, 3 * chunk_size, 4 * chunk_size):
        assert np.array_equal(
            decoded[start : start + chunk_size], values[start : start + chunk_size]
        )


@pytest.mark.parametrize("name", QUANTIZERS)
def test_extreme_values_stay_finite_without_warnings(name: str) -> None:
    """Values near float32 max overflow the float32 work arrays; the codec must still
    produce a finite, mean-preserving decode and no RuntimeWarnings."""
    rng = np.random.default_rng(4)
    cases = [
        np.array([3e38, -3e38, 1.0, 0.0] * 8, dtype=np.float32),
        (rng.standard_normal(500) * 1e-42).astype(np.float32),  # denormals: tiny σ, huge 1/σ
        np.array([3.4e38] * 7 + [-3.4e38], dtype=np.float32),
    ]
    codec = get_codec(name, chunk_size=64)
    for values in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            decoded = codec.decode(codec.encode(torch.from_numpy(values)), values.shape).numpy()
        assert np.isfinite(decoded).all()
        exact = values.astype(np.float64)
        # table entries are float32: relative rounding, absolute for subnormals
        tolerance = (
            1e-6 * np.abs(exact).sum() + values.size * np.finfo(np.float32).smallest_subnormal
        )
        assert abs(decoded.astype(np.float64).sum() - exact.sum()) <= tolerance


def test_chunk_size_is_read_from_the_payload() -> None:
    original = torch.randn(10_000)
    payload = get_codec("int8", chunk_size=300).encode(original)
    decoded = get_codec("int8").decode(payload, original.shape)  # receiver's default chunk size
    assert rel_error(decoded, original) < 0.02
    assert len(payload) == get_codec("int8", chunk_size=300).payload_nbytes(10_000)


def test_range_sigmas_option_changes_the_bins() -> None:
    original = torch.randn(100_000, generator=torch.Generator().manual_seed(5))
    narrow, wide = get_codec("q4", range_sigmas=3.0), get_codec("q4")
    # for 16 bins on gaussian data ±3σ wastes fewer bins on empty tails than ±6σ
    assert rel_error(narrow.decode(narrow.encode(original), (100_000,)), original) < rel_error(
        wide.decode(wide.encode(original), (100_000,)), original
    )


def test_functional_api_matches_layout() -> None:
    values = np.random.default_rng(6).standard_normal(2500).astype(np.float32)
    table, codes = quantize_chunks(values, bits=2, chunk_size=1000)
    assert table.shape == (3, 4) and table.dtype == np.float32
    assert codes.shape == (2500,) and codes.dtype == np.uint8 and codes.max() < 4
    decoded = dequantize_chunks(table, codes, chunk_size=1000)
    assert np.array_equal(decoded[1000:2000], table[1][codes[1000:2000]])


def test_large_tensor_is_fast() -> None:
    """Guards the vectorisation (a per-element Python loop would take minutes): 4M elements
    take about 60 ms on one core; the bound is loose for slow CI machines."""
    original = torch.randn(4_000_000)
    codec = get_codec("int8")
    start = time.perf_counter()
    codec.decode(codec.encode(original), original.shape)
    assert time.perf_counter() - start < 3.0


def reference_chunk(chunk: np.ndarray, bits: int, range_sigmas: float = 6.0):
    """One chunk quantized the plain way, for comparison with the blocked implementation."""
    n_bins = 1 << bits
    mean = chunk.mean(dtype=np.float64)
    position = chunk - np.float32(mean)
    sigma = np.sqrt(np.square(position, dtype=np.float64).sum() / chunk.size)
    width = 2.0 * range_sigmas * sigma / n_bins
    scale = np.float32(1.0 / width) if width > 0 else np.float32(0.0)
    codes = np.clip(np.floor(position * scale + n_bins / 2), 0, n_bins - 1).astype(np.uint8)
    sums = np.bincount(codes, weights=chunk, minlength=n_bins)
    counts = np.bincount(codes, minlength=n_bins)
    centres = mean + (np.arange(n_bins) + 0.5 - n_bins / 2) * width
    return np.where(counts > 0, sums / np.maximum(counts, 1), centres).astype(np.float32), codes


@pytest.mark.parametrize(
    ("bits", "chunk_size", "count"),
    [(8, 65536, 200_001), (8, 100_000, 250_000), (4, 1000, 70_500), (2, 7, 20_003)],
)
def test_blocks_give_the_bits_of_one_chunk_at_a_time(bits, chunk_size, count) -> None:
    """The quantizer works on cache-sized blocks (one default chunk, or many small chunks at
    once; a short tail; a chunk larger than a block): the result is bit for bit the plain
    per-chunk computation, so any peer that re-encodes a mean gets the owner's bytes."""
    values = (np.random.default_rng(7).standard_normal(count) * 3e-3).astype(np.float32)
    table, codes = quantize_chunks(values, bits, chunk_size)
    for row, start in enumerate(range(0, count, chunk_size)):
        want_table, want_codes = reference_chunk(values[start : start + chunk_size], bits)
        assert np.array_equal(codes[start : start + chunk_size], want_codes)
        assert np.array_equal(table[row], want_table)
