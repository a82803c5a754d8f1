"""Keep the residual stream in E0[token] + span(U), so the `subspace` activation codec is exact.

Protocol Models (arXiv 2506.01260) make pipeline-parallel training send k ≪ d_model numbers
per token at a stage boundary by confining the residual stream. In our model three things
write to it:

    the embedding lookup            h0 = E[token]            (E = embed.weight)
    blocks.{i}.attn.proj.weight     W  (d, in)     h += W · attn(...)
    blocks.{i}.mlp.down.weight      W  (d, in)     h += W · mlp(...)

The writers are kept inside span(U) (W = U U^T W), and the lookup writes the confined view
E0[token] + (E[token] − E0[token]) U U^T of the embedding (`confined_embedding`, set on the
model by `confine_module`); then every stream value is E0[token] + U c and the codec sends c
(`compression/activation.py` explains why its backward is exact too). E0 is the model's
*initial* embedding for the run's seed (`basis_for_model`), so the stream starts where an
unconfined model's does and the view's learnable part starts at zero.

The embedding *parameter* is not confined: the tied output head (stage 0, beside the loss)
reads the whole of E and is no residual writer, so it learns in all d_model dimensions;
only its use as the lookup is projected, and autograd gives that path the projected
gradient (dL/dh0) U U^T by itself. (Confining the parameter instead, as this module first
did, also squeezes the head's learnable part into span(U): scripts/sim_subspace.py's
`head-confined` variant, +2.7% against +2.4% at 32x, see README.)

This is projected gradient descent for the writers, and the trainer keeps it so:

1. `confine_` once after building the model (the writers' random init is not in span(U));
2. every inner step: backward, `confine_grads_`, optimizer step, `confine_`;
3. `confine_` after every outer update (averaged, quantized pseudo-gradients leave the span).

and the writers step at sqrt(k/d) of the run's learning rate (`writer_lr_scale`). AdamW
moves every element of a d × n writer by about lr whatever the gradient's size, so its
step has norm ~lr·sqrt(d·n) — and after the projection nearly all of it lies in span(U),
k of the d directions: per direction sqrt(d/k) times the step of an unconfined writer.
At sqrt(k/d) the step is lr·sqrt(k·n), the step AdamW takes on the k × n coordinate
matrix itself (Protocol Models' reparametrisation W = U·W'). Measured with
scripts/bench_pipeline.py over 3 seeds: at 32x (4-bit, k = 28 of 128) the gap to
uncompressed falls from +3.3% to +2.9%, at 100x (float16, k = 2) from +34% to +17% (README).

`confine_` alone keeps the stream in the subspace. `confine_grads_` makes the step itself
independent of the gradient's part outside span(U), which the codec's backward does not
carry: AdamW normalises each element by its own running magnitude, so an unprojected
gradient would give compressed and uncompressed runs different in-span updates.
(Protocol Models likewise modify AdamW for the subspace.)

Both functions take a stage's `{name: parameter}` dict (or an nn.Module) and skip
parameters it does not hold: a pipeline stage owns a slice of the model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch
from torch import nn

from shoal.compression import SubspaceBasis
from shoal.train import ModelConfig, build_model

RESIDUAL_WRITERS = ("attn.proj.weight", "mlp.down.weight")
# U is drawn from its own stream, not the one that drew E0 (same seed, different salt)
_BASIS_SEED_SALT = 0x5EED_0F_5AB5


def _named_params(params: Mapping[str, torch.Tensor] | nn.Module) -> Mapping[str, torch.Tensor]:
    return dict(params.named_parameters()) if isinstance(params, nn.Module) else params


def _is_writer(name: str) -> bool:
    return name.endswith(RESIDUAL_WRITERS)


def _project_(name: str, tensor: torch.Tensor, basis: SubspaceBasis) -> bool:
    """Project one writer's weight or gradient in place (W ← U U^T W); False if `name` is
    not a residual writer."""
    if not _is_writer(name):
        return False
    if tensor.ndim != 2 or tensor.shape[0] != basis.d_model:
        raise ValueError(
            f"{name}: expected ({basis.d_model}, in_features), got {tuple(tensor.shape)}"
        )
    U, _ = basis.on(tensor.device)
    tensor.copy_(U @ (U.T @ tensor.float()))
    return True


@torch.no_grad()
def confine_(params: Mapping[str, torch.Tensor] | nn.Module, basis: SubspaceBasis) -> list[str]:
    """Project the residual-writing weights present in `params` so they write into span(U)
    (see module doc). In place; returns the names it projected."""
    return [name for name, param in _named_params(params).items() if _project_(name, param, basis)]


@torch.no_grad()
def confine_grads_(
    params: Mapping[str, torch.Tensor] | nn.Module, basis: SubspaceBasis
) -> list[str]:
    """Project the `.grad` of the residual-writing weights onto what a confined writer may
    move by (G ← U U^T G). Call after backward, before the optimizer step. In place; returns
    the names it projected (grad not None)."""
    return [
        name
        for name, param in _named_params(params).items()
        if param.grad is not None and _project_(name, param.grad, basis)
    ]


@torch.no_grad()
def confinement_error(
    params: Mapping[str, torch.Tensor] | nn.Module, basis: SubspaceBasis
) -> float:
    """Largest relative norm, over the residual writers present, of the part outside
    span(U) (‖W − U U^T W‖ / ‖W‖): ~1e-7 right after `confine_`."""
    worst = 0.0
    for name, param in _named_params(params).items():
        if not _is_writer(name):
            continue
        U, _ = basis.on(param.device)
        values = param.float()
        scale = float(values.norm())
        if scale > 0:
            worst = max(worst, float((values - U @ (U.T @ values)).norm()) / scale)
    return worst


def confined_embedding(rows: torch.Tensor, ids: torch.Tensor, basis: SubspaceBasis) -> torch.Tensor:
    """What the embedding lookup writes to a confined stream: E0[ids] + (rows − E0[ids]) U U^T
    for rows = E[ids]. Differentiable (the rows' gradient comes out projected, G U U^T)."""
    U, E0 = basis.on(rows.device)
    fixed = E0[ids]
    return fixed + ((rows - fixed) @ U) @ U.T


class Confinement:
    """The subspace as an inner-trainer constraint (optim.inner.Constraint): writers'
    gradients projected before each step, their weights after it and after every outer
    update. Build it with `confine_module`, which also confines the module's lookup."""

    def __init__(self, basis: SubspaceBasis) -> None:
        self.basis = basis

    def grads(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        return confine_grads_(params, self.basis)

    def weights(self, params: Mapping[str, torch.Tensor]) -> list[str]:
        return confine_(params, self.basis)

    def lr_scales(self, params: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {name: writer_lr_scale(self.basis) for name in params if _is_writer(name)}


def writer_lr_scale(basis: SubspaceBasis) -> float:
    """The confined writers' learning-rate factor, sqrt(k / d_model) (module doc)."""
    return math.sqrt(basis.k / basis.d_model)


def confine_module(module: nn.Module, basis: SubspaceBasis) -> Confinement:
    """Confine a model or stage module to E0 + span(U): its embedding lookup (if it has one:
    the model, or stage 0) writes `confined_embedding` from now on, and the returned
    constraint keeps its writers in span(U) when given to the trainer (ParamTrainer)."""
    if hasattr(module, "embedding_view"):
        module.embedding_view = functools.partial(confined_embedding, basis=basis)
    return Confinement(basis)


def basis_for_model(model_config: ModelConfig | str, k: int, seed: int) -> SubspaceBasis:
    """The run's basis: E0 = the initial `embed.weight` of `build_model(model_config, seed)`
    (bit-identical on every peer), U from `SubspaceBasis.from_seed(d_model, k, ...)` with a
    seed derived from `seed`. Builds the whole model once on the CPU to read E0."""
    E0 = build_model(model_config, seed).embed.weight.detach()
    basis_seed = (seed + _BASIS_SEED_SALT) % (1 << 63)
    return SubspaceBasis.from_seed(E0.shape[1], k, basis_seed, E0)
