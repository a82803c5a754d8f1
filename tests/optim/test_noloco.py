import struct
import zlib

import numpy as np
import pytest
import torch

from shoal.compression.base import _CRC_OFFSET, HEADER, MAGIC
from shoal.optim.noloco import DELTA, PHI, NoLoCo
from shoal.optim.outer import ContributionError
from shoal.optim.registry import outer_config


def raw_payload(codec, values: np.ndarray) -> bytes:
    """A well-formed payload (header, length, CRC) around arbitrary values, NaN included."""
    body = values.tobytes()
    prefix = HEADER.pack(MAGIC, codec.codec_id, codec.version, values.size, 0)[:_CRC_OFFSET]
    return prefix + struct.pack("<I", zlib.crc32(body, zlib.crc32(prefix))) + body


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, 16, generator=g), "b": torch.randn(33, generator=g)}


def drift(tensors, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in tensors.items()}


def test_pair_step_matches_the_noloco_update():
    """m ← μm + η·mean(d) + η·(mean(φ) − φ_i); φ ← φ + m, over two steps (momentum carried)."""
    config = outer_config("noloco", codec="fp32")
    me, partner = NoLoCo(weights(), config), NoLoCo(weights(), config)
    partner.params = drift(partner.params, 1e-2, seed=1)  # replicas' slow weights differ
    phi, m = (
        {n: t.clone() for n, t in me.params.items()},
        {n: torch.zeros_like(t) for n, t in me.params.items()},
    )
    for step in range(2):
        theta_i, theta_j = (
            drift(me.params, 1e-3, seed=10 + step),
            drift(partner.params, 1e-3, seed=20 + step),
        )
        phi_j = {n: t.clone() for n, t in partner.params.items()}
        distance = (sum(float((phi[n] - phi_j[n]).square().sum()) for n in phi) / 161) ** 0.5
        group = [
            me.decode_contribution(me.contribution(theta_i)),
            me.decode_contribution(partner.contribution(theta_j)),
        ]
        me.apply(group)
        for n in phi:
            d_mean = ((theta_i[n] - phi[n]) + (theta_j[n] - phi_j[n])) / 2
            m[n] = 0.5 * m[n] + 0.7 * d_mean + 0.7 * ((phi[n] + phi_j[n]) / 2 - phi[n])
            phi[n] = phi[n] + m[n]
            # φ travels as fp16 of φ − θ₀: error ≲ 2^-11 of the distance from θ₀ (here ~1e-2)
            torch.testing.assert_close(me.params[n], phi[n], rtol=0, atol=2e-5)
        assert me.partner_distance == pytest.approx(distance, rel=1e-3)
        partner.apply(group)


def test_alone_is_a_momentum_step_on_own_progress():
    outer = NoLoCo(weights(), outer_config("noloco", codec="fp32"))
    start = {n: t.clone() for n, t in outer.params.items()}
    local = drift(start, 1e-3, seed=3)
    outer.apply([outer.decode_contribution(outer.contribution(local))])
    for n in start:
        torch.testing.assert_close(
            outer.params[n], start[n] + 0.7 * (local[n] - start[n]), rtol=0, atol=1e-6
        )
    assert outer.partner_distance is None


def test_pairing_pulls_slow_weights_together():
    config = outer_config("noloco", codec="int8")
    a, b = NoLoCo(weights(), config), NoLoCo(weights(), config)
    b.params = drift(b.params, 1e-2, seed=5)
    distances = []
    for _ in range(4):
        pa, pb = (
            a.contribution(a.params),
            b.contribution(b.params),
        )  # no local progress: only the pull
        group = [a.decode_contribution(pa), a.decode_contribution(pb)]
        a.apply(group)
        b.apply(group)
        distances.append(a.partner_distance)
    assert distances[-1] < 0.5 * distances[0], distances  # momentum overshoots, so not monotone


def test_topk_progress_uses_error_feedback():
    outer = NoLoCo({"w": torch.zeros(128, 128)}, outer_config("noloco", codec="topk"))
    local = {"w": torch.randn(128, 128) * 1e-3}
    payload = outer.contribution(local)
    sent = outer.decode_contribution(payload).delta["w"]
    assert 0 < int((sent != 0).sum()) <= 4 * 64
    torch.testing.assert_close(
        outer.error["w"] + sent, local["w"], rtol=0, atol=1e-9
    )  # e = d − sent


@pytest.mark.parametrize(
    "damage", ["nan_phi", "inf_delta", "extra_key", "missing_half", "not_a_map"]
)
def test_bad_contributions_are_refused(damage):
    outer = NoLoCo(weights(), outer_config("noloco", codec="fp32"))
    payload = outer.contribution(drift(outer.params, 1e-3, seed=0))
    if damage == "nan_phi":
        payload[PHI + "a"] = raw_payload(outer.phi_codec, np.full(128, np.nan, dtype="<f2"))
    elif damage == "inf_delta":
        payload[DELTA + "b"] = raw_payload(outer.codec, np.full(33, np.inf, dtype="<f4"))
    elif damage == "extra_key":
        payload["a"] = payload[DELTA + "a"]
    elif damage == "missing_half":
        payload = {k: v for k, v in payload.items() if k.startswith(DELTA)}
    else:
        payload = [payload]
    with pytest.raises(ContributionError):
        outer.decode_contribution(payload)
