"""SparseLoCo (Templar, arXiv 2508.15706): top-k sparse, 2-bit pseudo-gradients with
error feedback, and a robust sparse aggregate.

Per replica, with error buffer e (local, never shared; a joiner starts with e = 0):

    e ← β·e + Δ                           Δ = θ − θ_local, β = `error_decay` (0.95)
    send = top-k of e per chunk            k = 64 of 4096; 64x64 tiles for 2-D weights
           values quantized to 2 bits      (codec "topk", see compression/topk.py)
    e ← e − decoded(send)                  what was not sent stays for later rounds

Every peer aggregates the round's contributions the same way:

    clip: each contribution is scaled to at most the median L2 norm of the round's
          contributions (a huge or malicious one weighs no more than a typical one);
          with pipeline stages, per stage slice of the model, over the contributions
          that hold that slice, so full replicas and stage peers clip it alike
    agg[i] = mean over the peers that sent index i of their (clipped) value
    θ ← θ − α·agg                          α = `lr` (1.0), no outer momentum

Applied sparsely: θ[i] −= α·s_j·v_j[i] / n_i for each contribution j (n_i: how many sent
index i), contributions in peer-id order with one write per index each, so the result is
bit-identical on every peer.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from shoal.compression import TopKCodec, get_codec
from shoal.compression.topk import BatchCodecError
from shoal.optim.outer import ContributionError, OuterConfig, OuterOptimizer, Tensors


def send_with_error_feedback(
    codec: TopKCodec,
    error: Tensors,
    plus: Mapping[str, torch.Tensor],
    minus: Mapping[str, torch.Tensor],
    decay: float,
) -> dict[str, bytes]:
    """e ← β·e + (plus − minus), in place (no model-sized temporary); payload = top-k of e
    (all tensors encoded in one batch); e ← e − decoded(payload) (decoded in one batch
    too). Returns the payload by tensor name."""
    for name, buffer in error.items():
        buffer.mul_(decay).add_(plus[name].detach().to("cpu", torch.float32)).sub_(
            minus[name].detach().to("cpu", torch.float32)
        )
    payloads = codec.encode_many(list(error.values()))
    decoded = codec.decode_sparse_many(payloads, [tuple(buffer.shape) for buffer in error.values()])
    for buffer, (indices, values) in zip(error.values(), decoded, strict=True):
        buffer.view(-1).index_add_(0, indices, values, alpha=-1.0)
    return dict(zip(error, payloads, strict=True))


@dataclass(frozen=True)
class SparseContribution:
    """One peer's decoded contribution: per tensor, the flat indices it sent and their values."""

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def norm(self, names: Sequence[str] | None = None) -> float:
        """L2 norm over `names` (default: every tensor it holds)."""
        values = self.values.values() if names is None else [self.values[n] for n in names]
        return sum(float(v.double().square().sum()) for v in values) ** 0.5


class SparseLoCo(OuterOptimizer):
    supports_slices = True

    def __init__(
        self,
        outer_weights: Mapping[str, torch.Tensor],
        config: OuterConfig,
        slices: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__(outer_weights, config, slices)
        codec = (
            get_codec(config.codec, k=config.topk)
            if config.codec == "topk"
            else get_codec(config.codec)
        )
        if not isinstance(codec, TopKCodec):
            raise ValueError(f"--outer sparseloco needs --codec topk, got {config.codec!r}")
        self.codec: TopKCodec = codec
        self.error: Tensors = {n: torch.zeros_like(t) for n, t in self.params.items()}

    def contribution(self, local_weights: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
        self._check_names(list(local_weights), "local weights")
        return send_with_error_feedback(
            self.codec, self.error, self.params, local_weights, self.config.error_decay
        )

    def decode_contribution(self, payload: Mapping[str, bytes]) -> SparseContribution:
        # names and payload types checked as for every optimizer; the codec work in one batch
        blobs = self._decode_each(payload, lambda blob, _shape: blob)
        names = list(blobs)
        try:
            pairs = self.codec.decode_sparse_many(
                [blobs[n] for n in names], [self.shapes[n] for n in names]
            )
        except BatchCodecError as exc:
            raise ContributionError(f"{names[exc.index]}: {exc}") from None
        return SparseContribution(
            {n: p[0] for n, p in zip(names, pairs, strict=True)},
            {n: p[1] for n, p in zip(names, pairs, strict=True)},
        )

    def apply(self, contributions: Sequence[SparseContribution]) -> None:
        for names in self.slices:
            names = [n for n in names if n in self.params]
            held = [c for c in contributions if names and names[0] in c]
            if not held:
                continue
            norms = [c.norm(names) for c in held]
            median = statistics.median_low(norms)
            scales = [1.0 if n <= median or n == 0 else median / n for n in norms]
            for name in names:
                # sparse throughout: a dense mean would write and read the whole tensor
                # several times, where the round's entries are ~8·k/4096 of it
                senders = torch.zeros(
                    self.params[name].numel(), dtype=torch.uint8 if len(held) < 256 else torch.int32
                )
                for contribution in held:
                    idx = contribution.indices[name]
                    senders.index_add_(0, idx, torch.ones(idx.numel(), dtype=senders.dtype))
                param = self.params[name].view(-1)
                for contribution, scale in zip(held, scales, strict=True):
                    idx = contribution.indices[name]
                    param.index_add_(
                        0,
                        idx,
                        contribution.values[name] / senders[idx],
                        alpha=-self.config.lr * scale,
                    )
