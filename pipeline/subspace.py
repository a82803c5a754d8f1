"""Keep the residual stream in E0[token] + span(U), so the `subspace` activation codec is exact.

Protocol Models (arXiv 2506.01260) make pipeline-parallel training send k ≪ d_model numbers
per token at a stage boundary by confining the residual stream. In our model only three
parameters write to it:

    embed.weight                    E  (vocab, d)  h0 = E[token]
    blocks.{i}.attn.proj.weight     W  (d, in)     h += W · attn(...)
    blocks.{i}.mlp.down.weight      W  (d, in)     h += W · mlp(...)

With W = U U^T W for every writer and E = E0 + (E − E0) U U^T, every stream value is
E0[token] + U c: the codec sends c (`compression/activation.py` explains why its backward
is exact too). E0 is the model's *initial* embedding for the run's seed (`basis_for_model`),
so the learnable part E − E0 starts at zero and the embedding stays full rank.

This is projected gradient descent, and the trainer keeps it so:

1. `confine_` once after building the model (the writers' random init is not in span(U));
2. every inner step: backward, `confine_grads_`, optimizer step, `confine_`;
3. `confine_` after every outer update (averaged, quantized pseudo-gradients leave the span).

`confine_` alone keeps the stream in the subspace. `confine_grads_` makes the step itself
independent of the gradient's part outside span(U), which the codec's backward does not
carry: AdamW normalises each element by its own running magnitude, so an unprojected
gradient would give compressed and uncompressed runs different in-span updates.
(Protocol Models likewise modify AdamW for the subspace.)

Both functions take a stage's `{name: parameter}` dict (or an nn.Module) and skip
parameters it does not hold: a pipeline stage owns a slice of the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from shoal.compression import SubspaceBasis
from shoal.train import ModelConfig, build_model

RESIDUAL_WRITERS = ("attn.proj.weight", "mlp.down.weight")
EMBEDDING = "embed.weight"
# U is drawn from its own stream, not the one that drew E0 (same seed, different salt)
_BASIS_SEED_SALT = 0x5EED_0F_5AB5


def _named_params(params: Mapping[str, torch.Tensor] | nn.Module) -> Mapping[str, torch.Tensor]:
    return dict(params.named_parameters()) if isinstance(params, nn.Module) else params


def _role(name: str) -> str | None:
    """How a parameter touches the stream: "writer", "embedding" or None (it does not write)."""
    if name.endswith(RESIDUAL_WRITERS):
        return "writer"
    if name == EMBEDDING or name.endswith("." + EMBEDDING):
        return "embedding"
    return None


def _project_(name: str, tensor: torch.Tensor, basis: SubspaceBasis, *, shift: bool) -> bool:
    """Project one writer (W ← U U^T W) or the embedding (E ← E0 + (E − E0) U U^T; without
    `shift`, a gradient: G ← G U U^T) in place. False if `name` is not a residual writer."""
    role = _role(name)
    if role is None:
        return False
    U, E0 = basis.on(tensor.device)
    values = tensor.float()
    if role == "writer":
        if tensor.ndim != 2 or tensor.shape[0] != basis.d_model:
            raise ValueError(f"{name}: expected ({basis.d_model}, in_features), got {tuple(tensor.shape)}")
        tensor.copy_(U @ (U.T @ values))
    else:
        if tuple(tensor.shape) != tuple(E0.shape):
            raise ValueError(f"{name}: expected the basis' E0 shape {tuple(E0.shape)}, got {tuple(tensor.shape)}")
        if shift:
            tensor.copy_(E0 + ((values - E0) @ U) @ U.T)
        else:
            tensor.copy_((values @ U) @ U.T)
    return True


@torch.no_grad()
def confine_(params: Mapping[str, torch.Tensor] | nn.Module, basis: SubspaceBasis) -> list[str]:
    """Project the residual-writing weights present in `params` so they write into span(U)
    (see module doc). In place; returns the names it projected."""
    return [name for name, param in _named_params(params).items() if _project_(name, param, basis, shift=True)]


@torch.no_grad()
def confine_grads_(params: Mapping[str, torch.Tensor] | nn.Module, basis: SubspaceBasis) -> list[str]:
    """Project the `.grad` of the residual-writing weights onto what a confined parameter may
    move by: G ← U U^T G for writers, G ← G U U^T for the embedding. Call after backward,
    before the optimizer step. In place; returns the names it projected (grad not None)."""
    return [
        name
        for name, param in _named_params(params).items()
        if param.grad is not None and _project_(name, param.grad, basis, shift=False)
    ]


@torch.no_grad()
def confinement_error(params: Mapping[str, torch.Tensor] | nn.Module, basis: SubspaceBasis) -> float:
    """Largest relative norm, over the residual writers present, of the part outside the
    confined set (‖W − U U^T W‖ / ‖W‖; for E, of E − E0): ~1e-7 right after `confine_`."""
    worst = 0.0
    for name, param in _named_params(params).items():
        role = _role(name)
        if role is None:
            continue
        U, E0 = basis.on(param.device)
        values = param.float() - E0 if role == "embedding" else param.float()
        projected = U @ (U.T @ values) if role == "writer" else (values @ U) @ U.T
        scale = float(values.norm())
        if scale > 0:
            worst = max(worst, float((values - projected).norm()) / scale)
    return worst


class Confinement:
    """The subspace as an inner-trainer constraint (optim.inner.Constraint): gradients
    projected before each step, weights after it and after every outer update."""

    def __init__(self, basis: SubspaceBasis) -> None:
        self.basis = basis

    def grads(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        return confine_grads_(params, self.basis)

    def weights(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        return confine_(params, self.basis)


def basis_for_model(model_config: ModelConfig | str, k: int, seed: int) -> SubspaceBasis:
    """The run's basis: E0 = the initial `embed.weight` of `build_model(model_config, seed)`
    (bit-identical on every peer), U from `SubspaceBasis.from_seed(d_model, k, ...)` with a
    seed derived from `seed`. Builds the whole model once on the CPU to read E0."""
    E0 = build_model(model_config, seed).embed.weight.detach()
    basis_seed = (seed + _BASIS_SEED_SALT) % (1 << 63)
    return SubspaceBasis.from_seed(E0.shape[1], k, basis_seed, E0)
