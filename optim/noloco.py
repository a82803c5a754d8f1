"""NoLoCo (Kolehmainen et al., Gensyn, arXiv 2506.10911): outer steps without all-reduce.

Every replica i keeps its own slow weights φ_i and momentum m_i; replicas are never forced
to agree. After H inner steps (θ_i: its fast weights) a replica publishes φ_i and its
progress d_i = θ_i − φ_i, picks one live partner j, fetches the partner's pair for the same
step and, over the group G = {i, j} (just {i} when the partner fails), takes

    φ̄ = mean_G φ_g      d̄ = mean_G d_g
    m_i ← μ·m_i + η·d̄ + η·(φ̄ − φ_i)        η = `lr` (0.7), μ = `momentum` (0.5)
    φ_i ← φ_i + m_i;   θ_i ← φ_i

The first term is a DiLoCo-style step on the averaged progress, the second pulls the slow
weights of the pair together; random pairings mix the whole swarm over a few steps
(gossip averaging), so no step waits for more than one other peer.

On the wire: d_i goes through the run's codec (fp32, fp16, int8, or topk with error
feedback as in SparseLoCo: e ← β·e + d, send top-k of e, e ← e − sent). φ_i goes as fp16
of φ_i − θ₀, where θ₀ are the run's initial weights that every peer rebuilds from the seed:
fp16 then keeps 11 bits of precision on the distance travelled rather than on the weights
themselves (an RMSNorm gain of 1.0 would otherwise round at 5e-4). A peer applies the
decoded form of its own contribution too, exactly as its partner sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from shoal.compression import TopKCodec, get_codec
from shoal.optim.outer import ContributionError, OuterConfig, OuterOptimizer, Tensors
from shoal.optim.sparseloco import send_with_error_feedback

PHI, DELTA = "phi/", "delta/"


@dataclass(frozen=True)
class PairContribution:
    """One replica's decoded (φ, d), dense."""

    phi: Tensors
    delta: Tensors


class NoLoCo(OuterOptimizer):
    pairwise = True

    def __init__(self, outer_weights: Mapping[str, torch.Tensor], config: OuterConfig) -> None:
        super().__init__(outer_weights, config)
        self.codec = (
            get_codec(config.codec, k=config.topk)
            if config.codec == "topk"
            else get_codec(config.codec)
        )
        self.phi_codec = get_codec("fp16")
        self.origin: Tensors = {
            n: t.clone() for n, t in self.params.items()
        }  # θ₀, before any checkpoint load
        self.momentum: Tensors = {n: torch.zeros_like(t) for n, t in self.params.items()}
        self.error: Tensors | None = (
            {n: torch.zeros_like(t) for n, t in self.params.items()}
            if isinstance(self.codec, TopKCodec)
            else None
        )
        self.partner_distance: float | None = (
            None  # RMS of φ_i − φ_j over all weights, last exchange
        )

    def contribution(self, local_weights: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
        self._check_names(list(local_weights), "local weights")
        payload = {
            PHI + n: self.phi_codec.encode(phi - self.origin[n]) for n, phi in self.params.items()
        }
        if self.error is None:
            payload.update(
                {
                    DELTA + n: self.codec.encode(
                        local_weights[n].detach().to("cpu", torch.float32) - phi
                    )
                    for n, phi in self.params.items()
                }
            )
            return payload
        sent = send_with_error_feedback(
            self.codec, self.error, local_weights, self.params, self.config.error_decay
        )
        return payload | {DELTA + n: blob for n, blob in sent.items()}

    def decode_contribution(self, payload: Mapping[str, bytes]) -> PairContribution:
        if not isinstance(payload, Mapping):
            raise ContributionError("contribution must be a map of tensor name to payload")
        halves: dict[str, dict[str, bytes]] = {PHI: {}, DELTA: {}}
        for key, blob in payload.items():
            prefix = next((p for p in halves if isinstance(key, str) and key.startswith(p)), None)
            if prefix is None:
                raise ContributionError(
                    f"contribution: unexpected entry {str(key)[:40]!r} (want {PHI}… or {DELTA}…)"
                )
            halves[prefix][key[len(prefix) :]] = blob
        phi = self._decode_each(halves[PHI], self.phi_codec.decode)
        delta = self._decode_each(halves[DELTA], self.codec.decode)
        for what, tensors in (("phi", phi), ("delta", delta)):
            for name, tensor in tensors.items():
                if not torch.isfinite(tensor).all():
                    raise ContributionError(f"{what} {name}: non-finite values")
        return PairContribution({n: t.add_(self.origin[n]) for n, t in phi.items()}, delta)

    def apply(self, contributions: Sequence[PairContribution]) -> None:
        """`contributions` is the group: this replica's own decoded pair, plus its
        partner's when the exchange succeeded (in a fixed order)."""
        if not contributions:
            return
        eta, mu, scale = self.config.lr, self.config.momentum, 1.0 / len(contributions)
        squared = 0.0
        for name, phi in self.params.items():
            phis = [c.phi[name] for c in contributions]
            if len(phis) == 2:
                squared += float((phis[0] - phis[1]).double().square().sum())
            pull = torch.stack(phis).sum(0).mul_(scale).sub_(phi)  # φ̄ − φ_i
            delta_mean = torch.stack([c.delta[name] for c in contributions]).sum(0).mul_(scale)
            buf = self.momentum[name].mul_(mu).add_(delta_mean, alpha=eta).add_(pull, alpha=eta)
            phi.add_(buf)
        if len(contributions) == 2:
            self.partner_distance = (squared / sum(t.numel() for t in self.params.values())) ** 0.5

    def state_groups(self) -> dict[str, Tensors]:
        return {"outer/": self.params, "momentum/": self.momentum}
