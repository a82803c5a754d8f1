"""Activation codecs: round trips, exact sizes, the subspace basis, and rejection of every
malformed payload (corrupted, truncated, wrong shape, wrong microbatch, wrong basis, NaN)."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from shoal.compression import (
    ACTIVATION_CODECS,
    ActivationCodec,
    CodecError,
    SubspaceBasis,
    get_activation_codec,
    get_codec,
    subspace_dim_for_ratio,
)
from shoal.compression.activation import ACTIVATION_HEADER
from shoal.compression.base import codec_name

D_MODEL, VOCAB, K = 32, 256, 8


def make_basis(seed: int = 0, d_model: int = D_MODEL, k: int = K) -> SubspaceBasis:
    E0 = torch.randn(VOCAB, d_model, generator=torch.Generator().manual_seed(1000 + d_model)) * 0.02
    return SubspaceBasis.from_seed(d_model, k, seed, E0)


BASIS = make_basis()


def make_codec(name: str, basis: SubspaceBasis = BASIS) -> ActivationCodec:
    return (
        get_activation_codec(name, basis=basis)
        if name.startswith("subspace")
        else get_activation_codec(name)
    )


def sample(
    batch: int = 2, seq: int = 16, d_model: int = D_MODEL, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    return torch.randn(batch, seq, d_model, generator=generator), ids


def confined(ids: torch.Tensor, basis: SubspaceBasis = BASIS, seed: int = 0) -> torch.Tensor:
    """A stream value in E0[token] + span(U)."""
    coords = torch.randn(*ids.shape, basis.k, generator=torch.Generator().manual_seed(seed))
    return basis.E0[ids] + coords @ basis.U.T


def rel_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    return float((decoded - original).norm() / original.norm())


def recrc(payload: bytes) -> bytes:
    """Recompute the CRC after a deliberate edit: what a malicious peer would do."""
    crc_at = ACTIVATION_HEADER.size - 4
    crc = zlib.crc32(payload[ACTIVATION_HEADER.size :], zlib.crc32(payload[:crc_at]))
    return payload[:crc_at] + struct.pack("<I", crc) + payload[ACTIVATION_HEADER.size :]


# ---- registry, sizes, basis --------------------------------------------------------


def test_registry() -> None:
    assert set(ACTIVATION_CODECS) == {"none", "int8", "subspace", "subspace-int8", "subspace-int4"}
    for name in ACTIVATION_CODECS:
        codec = make_codec(name)
        assert codec.name == name and isinstance(codec, ActivationCodec)
        assert codec_name(codec.codec_id) == f"activation:{name}"  # no clash with tensor codecs
    with pytest.raises(
        ValueError,
        match="unknown activation codec 'fp8'.*int8, none, subspace, subspace-int4, subspace-int8",
    ):
        get_activation_codec("fp8")
    with pytest.raises(TypeError, match="basis"):
        get_activation_codec("subspace")
    with pytest.raises(TypeError, match="int8"):
        get_activation_codec("int8", basis=BASIS)


def test_bytes_per_token_at_d128() -> None:
    basis = make_basis(d_model=128, k=subspace_dim_for_ratio(128, 8))
    sizes = {name: make_codec(name, basis).bytes_per_token(128) for name in ACTIVATION_CODECS}
    assert sizes == {
        "none": 512.0,
        "int8": 132.0,
        "subspace": 62.0,
        "subspace-int8": 32.0,
        "subspace-int4": 17.0,
    }


@pytest.mark.parametrize("name", sorted(ACTIVATION_CODECS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 16), (3, 7), (0, 5)], ids=str)
def test_payload_size_is_exact(name: str, shape: tuple[int, int]) -> None:
    codec = make_codec(name)
    h, ids = sample(*shape)
    for payload in (codec.encode(h, ids), codec.encode_grad(h, ids)):
        n_tokens = shape[0] * shape[1]
        assert len(payload) == codec.header_nbytes + n_tokens * codec.bytes_per_token(D_MODEL)
        assert len(payload) == codec.payload_nbytes(n_tokens, D_MODEL)
    assert codec.decode(codec.encode(h, ids), ids, D_MODEL).shape == (*shape, D_MODEL)


def test_subspace_dim_for_ratio() -> None:
    assert [subspace_dim_for_ratio(128, ratio) for ratio in (8, 32, 100)] == [31, 7, 2]
    for d_model in (32, 128, 768):
        for ratio in (2, 4, 8, 16, 32, 100):
            k = subspace_dim_for_ratio(d_model, ratio)
            assert 4 * d_model / (2 * k + 1) >= ratio or k == 1
            assert k == d_model or 4 * d_model / (2 * (k + 1) + 1) < ratio
    assert subspace_dim_for_ratio(128, 1e6) == 1  # unreachable ratio: the minimum
    assert subspace_dim_for_ratio(128, 0.5) == 128
    assert subspace_dim_for_ratio(128, 32, vocab_size=50_000) == 7  # 2-byte token ids: 4·128/16
    # int8 coordinates: k + 1 bytes, plus the token id
    assert [subspace_dim_for_ratio(128, ratio, coordinates="int8") for ratio in (8, 32, 100)] == [
        62,
        14,
        3,
    ]
    for d_model in (32, 128, 768):
        for ratio in (2, 8, 32, 100):
            k = subspace_dim_for_ratio(d_model, ratio, coordinates="int8")
            assert 4 * d_model / (k + 2) >= ratio or k == 1
            assert k == d_model or 4 * d_model / (k + 3) < ratio
    # int4 coordinates: ceil(k/2) + 1 bytes, plus the token id
    assert [subspace_dim_for_ratio(128, ratio, coordinates="int4") for ratio in (8, 32, 100)] == [
        124,
        28,
        6,
    ]
    for d_model in (32, 128, 768):
        for ratio in (2, 8, 32, 100):
            k = subspace_dim_for_ratio(d_model, ratio, coordinates="int4")
            assert 4 * d_model / ((k + 1) // 2 + 2) >= ratio or k == 1
            assert k == d_model or 4 * d_model / ((k + 2) // 2 + 2) < ratio
    with pytest.raises(ValueError, match="coordinates"):
        subspace_dim_for_ratio(128, 32, coordinates="int3")
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="ratio"):
            subspace_dim_for_ratio(128, bad)


def test_basis_is_deterministic_and_identified() -> None:
    again = make_basis()
    assert again.basis_id == BASIS.basis_id and torch.equal(again.U, BASIS.U)
    assert len(BASIS.basis_id) == 16
    gram = BASIS.U.T @ BASIS.U
    assert torch.allclose(gram, torch.eye(K), atol=1e-6)
    assert make_basis(seed=1).basis_id != BASIS.basis_id
    assert SubspaceBasis(BASIS.U, BASIS.E0 + 1e-3).basis_id != BASIS.basis_id
    assert SubspaceBasis.for_ratio(128, 32, 0, torch.zeros(VOCAB, 128)).k == 7
    with pytest.raises(ValueError, match="orthonormal"):
        SubspaceBasis(BASIS.U * 2, BASIS.E0)
    with pytest.raises(ValueError, match="E0"):
        SubspaceBasis(BASIS.U, BASIS.E0[:, :-1])


# ---- round trips --------------------------------------------------------------------


def test_none_is_lossless() -> None:
    codec = make_codec("none")
    h, ids = sample()
    assert torch.equal(codec.decode(codec.encode(h, ids), ids, D_MODEL), h)
    assert torch.equal(codec.decode_grad(codec.encode_grad(h, ids), ids, D_MODEL), h)


def test_int8_per_token_error() -> None:
    codec = make_codec("int8")
    h, ids = sample()
    h[0, 0] = 0.0  # a zero row round-trips exactly
    h[1] *= 1e-6  # small rows keep their own scale (a gradient-sized row)
    for scale in (1.0, 1e-8, 1e4):
        for encode, decode in (
            (codec.encode, codec.decode),
            (codec.encode_grad, codec.decode_grad),
        ):
            original = h * scale
            decoded = decode(encode(original, ids), ids, D_MODEL)
            row_absmax = original.abs().amax(dim=-1, keepdim=True)
            assert ((decoded - original).abs() <= row_absmax / 254 * 1.001).all()
            assert rel_error(decoded[1], original[1]) < 0.01 and rel_error(decoded, original) < 0.01
            assert torch.equal(decoded[0, 0], torch.zeros(D_MODEL))


def test_subspace_exact_for_confined_stream() -> None:
    codec = make_codec("subspace")
    _, ids = sample()
    h = confined(ids)
    decoded = codec.decode(codec.encode(h, ids), ids, D_MODEL)
    assert rel_error(decoded - BASIS.E0[ids], h - BASIS.E0[ids]) < 1e-3  # fp16 rounding of z
    for scale in (1e-9, 1.0, 1e6):  # the per-payload power-of-two scale keeps fp16 precision
        g = (h - BASIS.E0[ids]) * scale  # a gradient inside span(U)
        assert rel_error(codec.decode_grad(codec.encode_grad(g, ids), ids, D_MODEL), g) < 1e-3


def test_subspace_int8_per_token_error() -> None:
    codec = make_codec("subspace-int8")
    _, ids = sample()
    z = torch.randn(*ids.shape, K, generator=torch.Generator().manual_seed(3))
    z[0, 0] = 0.0  # a zero token round-trips exactly
    z[1] *= 1e-6  # tokens keep their own scale
    # (encode, decode, what the stream adds, float32 rounding of that sum)
    forward = (codec.encode, codec.decode, BASIS.E0[ids], 1e-7)
    backward = (codec.encode_grad, codec.decode_grad, 0.0, 0.0)
    for scale, directions in (
        (1.0, (forward, backward)),
        (1e3, (forward, backward)),
        (1e-9, (backward,)),
    ):
        coords = z * scale
        for encode, decode, offset, slack in directions:
            decoded = (
                decode(encode(offset + coords @ BASIS.U.T, ids), ids, D_MODEL) - offset
            ) @ BASIS.U
            peak = coords.abs().amax(dim=-1, keepdim=True)
            # half a step, the step 2^e < 2·peak/127, plus float32 rounding through U
            assert ((decoded - coords).abs() <= peak / 127 * 1.0001 + 1e-5 * peak + slack).all()
            assert rel_error(decoded[1], coords[1]) < 0.01 and rel_error(decoded, coords) < 0.01
            assert decoded[0, 0].abs().max() < 1e-6 * scale


@pytest.mark.parametrize("k", [K, 7])  # an odd k pads a nibble
def test_subspace_int4_error(k: int) -> None:
    basis = make_basis(k=k)
    codec = make_codec("subspace-int4", basis)
    _, ids = sample(4, 32)
    generator = torch.Generator().manual_seed(5)
    # coordinates as a trained stream's: per-dimension offsets up to 4 deviations, spreads 0.3-3
    spread = 0.3 + 2.7 * torch.rand(k, generator=generator)
    z = 4 * spread * (2 * torch.rand(k, generator=generator) - 1) + spread * torch.randn(
        *ids.shape, k, generator=generator
    )
    z[0, 0] = 0.0
    forward = (codec.encode, codec.decode, basis.E0[ids])
    backward = (codec.encode_grad, codec.decode_grad, 0.0)
    for scale, directions in (
        (1.0, (forward, backward)),
        (1e3, (forward, backward)),
        (1e-9, (backward,)),
    ):
        coords = z * scale
        centred = coords - coords.mean(dim=(0, 1))
        for encode, decode, offset in directions:
            decoded = (
                decode(encode(offset + coords @ basis.U.T, ids), ids, D_MODEL) - offset
            ) @ basis.U
            # each code errs by at most half a token step; the step is <= 2^(1/4)·(the token's
            # peak of |centred / deviation|)/7 — deviations and means rounded up to a quarter
            # step and octave do not err, they only widen the bound a little
            assert rel_error(decoded, coords) < 0.05
            assert float((decoded - coords).norm() / centred.norm()) < 0.12  # ~10% of the spread
    # a payload of one token, and a token of zeros
    one = ids[:1, :1]
    assert (
        float(
            codec.decode_grad(codec.encode_grad(torch.zeros(1, 1, D_MODEL), one), one, D_MODEL)
            .abs()
            .max()
        )
        == 0.0
    )
    h = confined(one, basis)
    assert (
        rel_error(
            codec.decode(codec.encode(h, one), one, D_MODEL) - basis.E0[one], h - basis.E0[one]
        )
        < 0.12
    )


def test_subspace_lossy_outside_span() -> None:
    codec = make_codec("subspace")
    h, ids = sample()
    decoded = codec.decode(codec.encode(h, ids), ids, D_MODEL)
    projector = BASIS.U @ BASIS.U.T
    assert rel_error(decoded, h) > 0.5  # 8 of 32 dimensions survive
    assert rel_error(decoded, BASIS.E0[ids] + (h - BASIS.E0[ids]) @ projector) < 1e-3
    grad = codec.decode_grad(codec.encode_grad(h, ids), ids, D_MODEL)
    assert rel_error(grad, h @ projector) < 1e-3


def test_encode_accepts_bf16_and_refuses_bad_input() -> None:
    codec = make_codec("int8")
    h, ids = sample()
    assert rel_error(codec.decode(codec.encode(h.bfloat16(), ids), ids, D_MODEL), h) < 0.02
    for bad in (float("nan"), float("inf")):
        poisoned = h.clone()
        poisoned[1, 3, 5] = bad
        for name in ACTIVATION_CODECS:
            with pytest.raises(CodecError, match="NaN/Inf"):
                make_codec(name).encode_grad(poisoned, ids)
    with pytest.raises(CodecError, match="token_ids"):
        codec.encode(h, ids[:, :-1])
    with pytest.raises(CodecError, match="integer"):
        codec.encode(h, ids.float())
    with pytest.raises(CodecError, match=r"\(batch, seq\)"):
        codec.encode(h, ids[None])
    with pytest.raises(CodecError, match="token ids outside"):
        make_codec("subspace").encode(confined(ids), ids + VOCAB)
    with pytest.raises(CodecError, match="d_model 32, not 16"):
        make_codec("subspace").encode(h[..., :16], ids)


# ---- malformed payloads --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACTIVATION_CODECS))
def test_corruption_and_truncation_rejected(name: str) -> None:
    codec = make_codec(name)
    h, ids = sample(2, 4)
    payload = codec.encode(confined(ids), ids)
    step = max(1, len(payload) // 40)
    for position in [
        *range(ACTIVATION_HEADER.size + codec.prefix_nbytes),
        *range(0, len(payload), step),
    ]:
        corrupted = bytearray(payload)
        corrupted[position] ^= 0x10
        with pytest.raises(CodecError):
            codec.decode(bytes(corrupted), ids, D_MODEL)
    for length in (0, 3, ACTIVATION_HEADER.size - 1, ACTIVATION_HEADER.size, len(payload) - 1):
        with pytest.raises(CodecError):
            codec.decode(payload[:length], ids, D_MODEL)
    with pytest.raises(CodecError, match="bytes; 8 tokens"):
        codec.decode(recrc(payload + b"\0\0"), ids, D_MODEL)
    with pytest.raises(CodecError, match="must be bytes"):
        codec.decode("not bytes", ids, D_MODEL)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(ACTIVATION_CODECS))
def test_wrong_shape_microbatch_or_direction_rejected(name: str) -> None:
    codec = make_codec(name)
    _, ids = sample(2, 4)
    payload = codec.encode(confined(ids), ids)
    with pytest.raises(CodecError, match="describes shape"):
        codec.decode(payload, ids[:, :3], D_MODEL)
    with pytest.raises(CodecError, match="describes shape"):
        codec.decode(payload, ids.reshape(4, 2), D_MODEL)
    if not name.startswith(
        "subspace"
    ):  # the subspace basis fixes d_model: a ValueError on the receiver
        with pytest.raises(CodecError, match="describes shape"):
            codec.decode(payload, ids, D_MODEL * 2)
    with pytest.raises(CodecError, match="other token ids"):
        codec.decode(payload, (ids + 1) % VOCAB, D_MODEL)
    with pytest.raises(CodecError, match="carries an activation, but a gradient"):
        codec.decode_grad(payload, ids, D_MODEL)
    with pytest.raises(CodecError, match="carries a gradient, but an activation"):
        codec.decode(codec.encode_grad(confined(ids), ids), ids, D_MODEL)


def test_payloads_of_other_codecs_rejected() -> None:
    h, ids = sample()
    int8_payload = make_codec("int8").encode(h, ids)
    with pytest.raises(CodecError, match="encoded by 'activation:int8', not 'activation:none'"):
        make_codec("none").decode(int8_payload, ids, D_MODEL)
    with pytest.raises(CodecError, match="encoded by 'activation:int8', not 'int8'"):
        get_codec("int8").decode(int8_payload, h.shape)
    tensor_payload = get_codec("fp32").encode(h)
    with pytest.raises(CodecError, match="encoded by 'fp32'"):
        make_codec("none").decode(tensor_payload, ids, D_MODEL)


def test_subspace_basis_out_of_sync() -> None:
    _, ids = sample()
    payload = make_codec("subspace", make_basis(seed=1)).encode(confined(ids), ids)
    with pytest.raises(CodecError, match="basis out of sync"):
        make_codec("subspace").decode(payload, ids, D_MODEL)
    with pytest.raises(ValueError, match="d_model 32, not 64"):
        make_codec("subspace").decode(payload, ids, 64)


def test_non_finite_payloads_rejected() -> None:
    """Structurally valid payloads (CRC recomputed) that would decode to NaN/Inf."""
    h, ids = sample(2, 4)
    header = ACTIVATION_HEADER.size
    none = make_codec("none")
    payload = bytearray(none.encode(h, ids))
    payload[header : header + 4] = struct.pack("<f", float("nan"))
    with pytest.raises(CodecError, match="non-finite"):
        none.decode(recrc(bytes(payload)), ids, D_MODEL)

    int8 = make_codec("int8")
    for scale in (float("inf"), float("nan"), -1.0):
        payload = bytearray(int8.encode(h, ids))
        payload[header : header + 4] = struct.pack("<f", scale)
        with pytest.raises(CodecError, match="row scale"):
            int8.decode(recrc(bytes(payload)), ids, D_MODEL)
    payload = bytearray(int8.encode(h, ids))
    payload[header : header + 4] = struct.pack("<f", 3e38)  # finite scale, 127·scale overflows
    payload[header + 4 * 8] = 127
    with pytest.raises(CodecError, match="non-finite"):
        int8.decode(recrc(bytes(payload)), ids, D_MODEL)
    payload = bytearray(int8.encode(h, ids))
    payload[header + 4 * 8] = 0x80  # int8 -128
    with pytest.raises(CodecError, match="-128"):
        int8.decode(recrc(bytes(payload)), ids, D_MODEL)

    subspace = make_codec("subspace")
    start = header + subspace.prefix_nbytes
    payload = bytearray(subspace.encode(confined(ids), ids))
    payload[start : start + 2] = struct.pack("<e", float("inf"))
    with pytest.raises(CodecError, match="non-finite float16"):
        subspace.decode(recrc(bytes(payload)), ids, D_MODEL)
    payload = bytearray(subspace.encode(confined(ids), ids))
    payload[start - 1] = struct.pack("<b", -127)[0]  # scale exponent: values × 2^127
    with pytest.raises(CodecError, match="non-finite values"):
        subspace.decode(recrc(bytes(payload)), ids, D_MODEL)
    subspace8 = make_codec("subspace-int8")
    start = header + subspace8.prefix_nbytes
    payload = bytearray(subspace8.encode(confined(ids), ids))
    payload[start] = 127  # token 0's exponent: codes × 2^127 overflow float32
    with pytest.raises(CodecError, match="non-finite values"):
        subspace8.decode(recrc(bytes(payload)), ids, D_MODEL)
    subspace4 = make_codec("subspace-int4")
    start = (
        header + 8
    )  # after the basis id: deviation steps i8[k], mean steps i8[k], token scales i8[n]
    payload = bytearray(subspace4.encode(confined(ids), ids))
    payload[start : start + 2 * K + 8] = b"\x7f" * (
        2 * K + 8
    )  # every scale at its largest, 2^(127/4)
    payload[start + 2 * K + 8 :] = b"\xff" * (len(payload) - start - 2 * K - 8)  # codes +7
    # quarter-octave bytes cannot overflow float32 (2^31.75 · 2^31.75 · 7 · 32 < 3.4e38)
    assert bool(torch.isfinite(subspace4.decode(recrc(bytes(payload)), ids, D_MODEL)).all())
    payload = bytearray(subspace4.encode(confined(ids), ids))
    payload[-1] = 0x80  # low nibble 0
    with pytest.raises(CodecError, match="nibble 0"):
        subspace4.decode(recrc(bytes(payload)), ids, D_MODEL)
    payload = bytearray(subspace8.encode(confined(ids), ids))
    payload[start + ids.numel()] = 0x80  # int8 -128
    with pytest.raises(CodecError, match="-128"):
        subspace8.decode(recrc(bytes(payload)), ids, D_MODEL)
    with pytest.raises(CodecError, match="basis out of sync"):
        subspace8.decode(
            make_codec("subspace-int8", make_basis(seed=1)).encode(confined(ids), ids), ids, D_MODEL
        )
    bad_ids = ids + VOCAB  # sent with a matching token ids CRC: checked before E0[ids]
    payload = bytearray(subspace.encode(confined(ids), ids))
    payload[16:20] = struct.pack("<I", zlib.crc32(bad_ids.numpy().astype("<i8").tobytes()))
    with pytest.raises(CodecError, match="token ids outside"):
        subspace.decode(recrc(bytes(payload)), bad_ids, D_MODEL)
