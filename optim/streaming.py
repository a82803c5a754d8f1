"""Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512): sync one fragment of the
parameters at a time, overlap the exchange with training, and merge instead of overwrite.

The parameters are split into P fragments (`fragment_plan`). A "round" here is one
fragment's sync: round r syncs fragment r mod P after H/P inner steps (rounded so that P
rounds take exactly H steps), so each fragment still syncs once every H steps, at offsets
p·H/P, and the bytes on the wire per sync event fall by P. For that fragment:

    Δ = θ_outer[f] − θ_local[f]         encoded with the run's codec (q4 by default)
    g = mean Δ over the round's peers;  m[f] ← μ·m[f] + g
    θ_outer[f] ← θ_outer[f] − lr·(g + μ·m[f])
    θ_local[f] ← α·θ_local[f] + (1 − α)·θ_outer[f]      α = `mix` (0.5)

the outer step being DiLoCo's Nesterov step on the fragment alone. The node publishes Δ
and keeps training; the merge happens `overlap` (τ) inner steps later, when the exchange
has had that long to complete, so communication hides behind compute. θ_outer stays
identical on every peer (each applies the same fragments in the same order), which the
round protocol verifies as for DiLoCo.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from shoal.compression import get_codec
from shoal.optim.outer import ContributionError, OuterConfig, OuterOptimizer, Tensors

Piece = tuple[str, int, int]  # tensor name, flat start, flat stop
_LAYER = re.compile(r"(?:^|\.)(\d+)\.")


def fragment_plan(shapes: Mapping[str, tuple[int, ...]], fragments: int) -> list[list[Piece]]:
    """Split tensors into `fragments` groups of flat pieces, strided over layers.

    A tensor of layer i (the first `.<int>.` in its name, e.g. `blocks.3.mlp.up.weight`)
    goes whole to fragment i mod P, so each fragment holds every P-th layer. Tensors outside
    the layers (embedding, final norm) are cut into flat pieces that fill the fragments up
    to the same size, so with a layer count divisible by P every fragment holds exactly
    1/P of the parameters (the paper's fragments are layer groups; the even split is what
    bounds the peak bytes per sync)."""
    if fragments < 1:
        raise ValueError(f"--fragments must be >= 1, got {fragments}")
    plan: list[list[Piece]] = [[] for _ in range(fragments)]
    sizes = [0] * fragments
    rest: list[tuple[str, int]] = []
    for name in sorted(shapes, key=_layer_order):
        numel = 1
        for d in shapes[name]:
            numel *= d
        match = _LAYER.search(name)
        if match is None:
            rest.append((name, numel))
            continue
        p = int(match.group(1)) % fragments
        plan[p].append((name, 0, numel))
        sizes[p] += numel
    target = -(-(sum(sizes) + sum(n for _, n in rest)) // fragments)
    p = 0
    for name, numel in rest:
        start = 0
        while start < numel:
            while p < fragments - 1 and sizes[p] >= target:
                p += 1
            take = numel - start if p == fragments - 1 else min(numel - start, target - sizes[p])
            plan[p].append((name, start, start + take))
            sizes[p] += take
            start += take
    if any(not pieces for pieces in plan):
        raise ValueError(
            f"--fragments {fragments} leaves a fragment empty: the model has too few parameters"
        )
    return plan


def _layer_order(name: str) -> tuple[int, str]:
    match = _LAYER.search(name)
    return (int(match.group(1)) if match else -1, name)


class StreamingDiLoCo(OuterOptimizer):
    def __init__(self, outer_weights: Mapping[str, torch.Tensor], config: OuterConfig) -> None:
        super().__init__(outer_weights, config)
        self.codec = get_codec(config.codec)
        self.momentum: Tensors = {n: torch.zeros_like(t) for n, t in self.params.items()}
        self.plan = fragment_plan(self.shapes, config.fragments)
        self.fragment = 0  # which fragment the current round syncs (begin_round)

    @property
    def overlap_steps(self) -> int:
        return self.config.overlap

    def begin_round(self, round_id: int) -> None:
        self.fragment = round_id % len(self.plan)

    def round_steps(self, round_id: int, inner_steps: int) -> int:
        """Inner steps before round `round_id`'s sync: H/P, rounded so that any P
        consecutive rounds take exactly H steps."""
        p = len(self.plan)
        return (round_id + 1) * inner_steps // p - round_id * inner_steps // p

    def _gather(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(
            [
                tensors[n].detach().to("cpu", torch.float32).reshape(-1)[a:b]
                for n, a, b in self.plan[self.fragment]
            ]
        )

    def _scatter(self, flat: torch.Tensor, into: Mapping[str, torch.Tensor]) -> None:
        offset = 0
        for name, a, b in self.plan[self.fragment]:
            into[name].view(-1)[a:b].copy_(flat[offset : offset + b - a])
            offset += b - a

    def fragment_numel(self, fragment: int | None = None) -> int:
        return sum(b - a for _, a, b in self.plan[self.fragment if fragment is None else fragment])

    def contribution(self, local_weights: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
        return {f"fragment/{self.fragment}": self.codec.encode(self.flat_delta(local_weights))}

    def decode_contribution(self, payload: Mapping[str, bytes]) -> torch.Tensor:
        key = f"fragment/{self.fragment}"
        if not isinstance(payload, Mapping) or set(payload) != {key}:
            raise ContributionError(
                f"contribution must hold exactly {key!r} (this round's fragment)"
            )
        blob = payload[key]
        if not isinstance(blob, bytes):
            raise ContributionError(f"{key}: payload must be bytes")
        try:
            delta = self.codec.decode(blob, (self.fragment_numel(),))
        except ValueError as exc:  # CodecError is a ValueError
            raise ContributionError(f"{key}: {exc}") from None
        if not torch.isfinite(delta).all():
            raise ContributionError(f"{key}: non-finite values")
        return delta

    @property
    def reducible(self) -> bool:
        return not getattr(self.codec, "sparse", False) and self.config.exchange == "auto"

    def flat_delta(self, local_weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self._check_names(list(local_weights), "local weights")
        return self._gather(self.params) - self._gather(local_weights)

    def apply_mean(self, mean: torch.Tensor | Sequence[torch.Tensor] | None) -> None:
        if mean is not None and not isinstance(mean, torch.Tensor):
            mean = torch.cat(list(mean))
        self.apply([] if mean is None else [mean])

    def apply(self, contributions: Sequence[torch.Tensor]) -> None:
        if not contributions:
            return
        grad = contributions[0].clone()
        for other in contributions[1:]:
            grad.add_(other)
        grad.mul_(1.0 / len(contributions))
        mu = self.config.momentum
        buf = self._gather(self.momentum).mul_(mu).add_(grad)
        update = grad.add_(buf, alpha=mu) if self.config.nesterov else buf
        self._scatter(buf, self.momentum)
        self._scatter(self._gather(self.params).sub_(update, alpha=self.config.lr), self.params)

    def merged_local(self, local_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """θ_local with this round's fragment mixed toward θ_outer: α·local + (1 − α)·outer."""
        merged = {n: t.detach().to("cpu", torch.float32).clone() for n, t in local_weights.items()}
        alpha = self.config.mix
        self._scatter(
            self._gather(merged).mul_(alpha).add_(self._gather(self.params), alpha=1.0 - alpha),
            merged,
        )
        return merged

    def state_groups(self) -> dict[str, Tensors]:
        return {"outer/": self.params, "momentum/": self.momentum}
