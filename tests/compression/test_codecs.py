"""Every registered codec: round trips, input checks, exact sizes, registry behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.compression import CODECS, Codec, CodecError, get_codec

SHAPES = [(1,), (), (0,), (7,), (3, 0), (65536 * 2 + 123,), (300, 257), (3, 4, 5)]
# relative L2 error bounds on gaussian data (measured: int8 0.0135, q4 0.21, q2 0.59; topk
# keeps 64 of 4096 per chunk, 0.84-0.94: sparse by design, see test_topk.py)
REL_ERROR = {"fp32": 0.0, "fp16": 1e-3, "int8": 0.02, "q4": 0.25, "q2": 0.65, "topk": 0.96}


def rel_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    return float((decoded - original).norm() / original.norm())


def test_registry_names_and_ids() -> None:
    assert set(CODECS) == {"fp32", "fp16", "int8", "q4", "q2", "topk"}
    ids = [codec.codec_id for codec in CODECS.values()]
    assert len(set(ids)) == len(ids)
    for name, codec_class in CODECS.items():
        codec = get_codec(name)
        assert isinstance(codec, Codec) and codec.name == name and type(codec) is codec_class


def test_unknown_codec_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown codec 'int9'.*fp16, fp32, int8, q2, q4"):
        get_codec("int9")


def test_codec_options() -> None:
    assert get_codec("int8", chunk_size=4096, range_sigmas=4.0).chunk_size == 4096
    with pytest.raises(TypeError, match="fp32"):
        get_codec("fp32", chunk_size=4096)
    for bad in (0, -1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            get_codec("int8", chunk_size=bad)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="range_sigmas"):
            get_codec("q4", range_sigmas=bad)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip(name: str, shape: tuple[int, ...]) -> None:
    codec = get_codec(name)
    original = torch.randn(
        shape, generator=torch.Generator().manual_seed(len(shape) * 1000 + sum(shape))
    )
    payload = codec.encode(original)
    assert isinstance(payload, bytes)
    assert codec.nbytes(payload) == len(payload)
    if name == "topk":  # its chunking depends on the shape, and zstd may shrink it
        assert len(payload) <= codec.payload_nbytes(shape)
    else:
        assert len(payload) == codec.payload_nbytes(original.numel())
    decoded = codec.decode(payload, shape)
    assert decoded.dtype == torch.float32 and decoded.device.type == "cpu"
    assert decoded.shape == torch.Size(shape)
    assert torch.isfinite(decoded).all()
    if original.numel() == 1 and name != "fp16":
        # one element: zero variance, so even the quantizers are exact
        assert torch.equal(decoded, original)
    elif original.numel() > 1000:
        assert rel_error(decoded, original) <= REL_ERROR[name]
    if name == "fp32":
        assert torch.equal(decoded, original)
    if name == "fp16":
        assert torch.equal(decoded, original.half().float())


@pytest.mark.parametrize("name", sorted(CODECS))
def test_encode_is_deterministic_and_decode_owns_its_memory(name: str) -> None:
    codec = get_codec(name)
    original = torch.randn(10_000)
    payload = codec.encode(original)
    assert codec.encode(original.clone()) == payload  # every peer must see the same bytes
    decoded = codec.decode(payload, [10_000])
    before = decoded.clone()
    decoded += 1.0  # writable, and not a view into the payload or a shared table
    assert torch.equal(codec.decode(payload, torch.Size([10_000])), before)


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_and_layouts(name: str, dtype: torch.dtype) -> None:
    codec = get_codec(name)
    original = torch.randn(40, 30, dtype=dtype).t()  # non-contiguous too
    decoded = codec.decode(codec.encode(original), (30, 40))
    reference = original.float()
    tolerance = max(REL_ERROR[name], 1e-7)
    assert rel_error(decoded, reference) <= tolerance


@pytest.mark.parametrize("name", sorted(CODECS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_refused(name: str, bad: float) -> None:
    tensor = torch.randn(1000)
    tensor[517] = bad
    with pytest.raises(CodecError, match="NaN/Inf"):
        get_codec(name).encode(tensor)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_non_float_inputs_refused(name: str) -> None:
    codec = get_codec(name)
    with pytest.raises(CodecError, match="float32 range"):
        codec.encode(torch.tensor([1.0, 1e300], dtype=torch.float64))
    with pytest.raises(CodecError, match="floating-point"):
        codec.encode(torch.arange(10))
    with pytest.raises(CodecError, match="torch.Tensor"):
        codec.encode(np.zeros(10, dtype=np.float32))  # type: ignore[arg-type]


def test_fp16_refuses_overflow() -> None:
    with pytest.raises(CodecError, match="fp16"):
        get_codec("fp16").encode(torch.tensor([1.0, 1e5]))


def test_bad_receiver_shape_is_a_value_error() -> None:
    codec = get_codec("fp32")
    payload = codec.encode(torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        codec.decode(payload, (-4,))
    with pytest.raises(ValueError, match="shape"):
        codec.decode(payload, (2.0, 2))  # type: ignore[arg-type]
