"""DiLoCo's outer step (Douillard et al. 2023, arXiv 2311.08105, Algorithm 1).

After H inner AdamW steps, replica i sends Δ_i = θ − θ_i (the pseudo-gradient), encoded
by the run's codec (dense fp32, or int8 as in INTELLECT-1). Every peer averages the Δ_i
of the same set of replicas and takes one SGD step with Nesterov momentum on θ:

    g = mean_i Δ_i;  m ← μ·m + g;  θ ← θ − lr·(g + μ·m)

which is torch.optim.SGD(nesterov=True, dampening=0), written out here so the arithmetic
is elementwise and in a fixed order: bit-identical on every peer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from shoal.compression import get_codec
from shoal.optim.outer import ContributionError, OuterConfig, OuterOptimizer, Tensors


def overlaps(
    sizes_a: Sequence[int], sizes_b: Sequence[int]
) -> Iterator[tuple[int, int, int, int, int]]:
    """Two partitions of one flat vector into consecutive parts: (part of a, part of b,
    offset in that a part, offset in that b part, length) for every non-empty overlap."""
    i = j = at_i = at_j = 0
    while i < len(sizes_a) and j < len(sizes_b):
        length = min(sizes_a[i] - at_i, sizes_b[j] - at_j)
        if length > 0:
            yield i, j, at_i, at_j, length
        at_i, at_j = at_i + length, at_j + length
        if at_i == sizes_a[i]:
            i, at_i = i + 1, 0
        if at_j == sizes_b[j]:
            j, at_j = j + 1, 0


class DiLoCo(OuterOptimizer):
    supports_slices = True

    def __init__(
        self,
        outer_weights: Mapping[str, torch.Tensor],
        config: OuterConfig,
        slices: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__(outer_weights, config, slices)
        self.codec = get_codec(config.codec)
        self.momentum: Tensors = {n: torch.zeros_like(t) for n, t in self.params.items()}

    def contribution(self, local_weights: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
        self._check_names(list(local_weights), "local weights")
        payload = {}
        for name, outer in self.params.items():
            pseudo_grad = outer - local_weights[name].detach().to("cpu", torch.float32)
            payload[name] = self.codec.encode(pseudo_grad)
        return payload

    def decode_contribution(self, payload: Mapping[str, bytes]) -> Tensors:
        decoded = self._decode_each(payload, self.codec.decode)
        for name, tensor in decoded.items():
            if not torch.isfinite(tensor).all():
                raise ContributionError(f"{name}: non-finite values")
        return decoded

    @property
    def reducible(self) -> bool:
        dense = not getattr(self.codec, "sparse", False)
        return dense and len(self.slices) == 1 and self.config.exchange == "auto"

    def flat_delta(self, local_weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self._check_names(list(local_weights), "local weights")
        flat = torch.empty(sum(p.numel() for p in self.params.values()))
        start = 0
        for name, outer in self.params.items():  # θ − θ_local written in place: one pass
            local = local_weights[name].detach().to("cpu", torch.float32)
            stop = start + outer.numel()
            torch.sub(outer.reshape(-1), local.reshape(-1), out=flat[start:stop])
            start = stop
        return flat

    def apply_mean(self, mean: torch.Tensor | Sequence[torch.Tensor] | None) -> None:
        """The outer step with the swarm's mean, flat like `flat_delta`, whole or as
        consecutive pieces (reduce-scatter's shards: no model-sized concatenation). The mean
        is consumed: its storage is the step's scratch space."""
        if mean is None:
            return
        pieces = [mean] if isinstance(mean, torch.Tensor) else list(mean)
        sizes, piece_sizes = [p.numel() for p in self.params.values()], [p.numel() for p in pieces]
        if sum(piece_sizes) != sum(sizes):
            raise ValueError(f"the mean has {sum(piece_sizes)} elements, want {sum(sizes)}")
        params = list(self.params.items())
        flat = [piece.reshape(-1) for piece in pieces]
        # the step is elementwise: stepping each overlap of a tensor and a piece steps it all
        for i, j, at_i, at_j, length in overlaps(sizes, piece_sizes):
            name, param = params[i]
            self._step(
                param.view(-1)[at_i : at_i + length],
                self.momentum[name].view(-1)[at_i : at_i + length],
                flat[j][at_j : at_j + length],
            )

    def apply(self, contributions: Sequence[Tensors]) -> None:
        for name, param in self.params.items():
            # the mean over the contributions that hold this tensor (with pipeline stages, a
            # stage's slice is averaged over the full replicas and that stage's peers)
            held = self.holders(contributions, name)
            if not held:
                continue  # nobody contributed: keep θ (and momentum) as they are
            grad = held[0].clone()
            for other in held[1:]:  # fixed order, elementwise: identical on every peer
                grad.add_(other)
            if len(held) > 1:  # x · 1.0 is x: skip the pass
                grad.mul_(1.0 / len(held))
            self._step(param, self.momentum[name], grad)

    def _step(self, param: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor) -> None:
        """SGD with (Nesterov) momentum on one tensor; overwrites `grad`."""
        buf = momentum.mul_(self.config.momentum).add_(grad)
        update = grad.add_(buf, alpha=self.config.momentum) if self.config.nesterov else buf
        param.sub_(update, alpha=self.config.lr)

    def state_groups(self) -> dict[str, Tensors]:
        return {"outer/": self.params, "momentum/": self.momentum}
