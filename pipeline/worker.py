"""The compute side of a pipeline stage: forward, backward and inner steps on one slice.

A stage never keeps an autograd graph between a microbatch's forward and its backward:
it keeps the microbatch's *input* and recomputes the forward under autograd when the
gradient arrives (activation recomputation). That holds one activation per microbatch in
flight instead of every intermediate, lets an inner step happen while other microbatches
are between their forward and backward (their graphs would otherwise see weights changed
in place), and costs one extra forward per microbatch. What is saved is freed by the
backward, or after `saved_ttl_s` if the backward never comes (its driver died).

Gradients accumulate over the microbatches of one inner step; `step()` averages them
over the microbatches this stage saw, clips, and takes an AdamW step with the run's
schedule. With compression `subspace` the slice is kept confined to the subspace
(pipeline/subspace.py): gradients projected before every step, weights after every step
and every outer update.

Compute runs under the same autocast as full replicas (bf16 on CUDA, fp32 on the CPU);
what crosses stages is float32 before the activation codec.

All methods are called from one compute thread at a time (the peer's), plus
`load_weights`/`local_weights` from the training thread; a lock orders them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping

import torch
from torch import nn

from shoal.compression import SubspaceBasis
from shoal.optim.inner import InnerConfig, ParamTrainer
from shoal.pipeline.stages import BlockStage, EdgeStage
from shoal.pipeline.subspace import confine_module
from shoal.train.device import autocast_context

RESCALE_MODES = ("none", "sqrt", "inverse")


def residual_scale(mode: str, visit_probability: float) -> float:
    """The factor c by which a SkipPipe stage scales its residual update, h + c(f(h) − h),
    in training forwards: p^−1/2 (`sqrt`) or 1/p (`inverse`) for a stage on a fraction p
    of the paths, 1 for `none` or a stage on every path (p = 1).

    A stage skipped on part of the paths trains on inputs whose residual stream holds fewer
    updates than at evaluation, where every stage runs; scaling the updates that are there
    while training brings the stream's size towards the full pipeline's, so the later
    stages see at evaluation something closer to what they trained on. Held-out forwards
    (`/stage/infer`) are unscaled: the model stays a plain Transformer."""
    if mode not in RESCALE_MODES:
        raise ValueError(f"residual rescale must be one of {RESCALE_MODES}, not {mode!r}")
    if not 0.0 < visit_probability <= 1.0:
        raise ValueError(f"a visit probability is in (0, 1], not {visit_probability}")
    if mode == "none" or visit_probability == 1.0:
        return 1.0
    return visit_probability**-0.5 if mode == "sqrt" else 1.0 / visit_probability


def scaled_residual(block: torch.nn.Module, h: torch.Tensor, scale: float) -> torch.Tensor:
    """`block(h)` with its residual update scaled by `scale`: h + scale·(block(h) − h)."""
    out = block(h)
    return out if scale == 1.0 else h + scale * (out - h)


class UnknownMicrobatch(KeyError):
    """A backward for a microbatch this stage holds no input for (never seen, expired,
    or lost with a restart): the driver must run the microbatch again."""


class SliceTrainer(ParamTrainer):
    """A stage's inner-step state: its slice's parameters and AdamW (ParamTrainer), the
    gradients accumulated over microbatches, and a lock (hops run on the compute thread,
    the outer rounds on the training thread)."""

    def __init__(
        self,
        module: nn.Module,
        config: InnerConfig,
        device: torch.device,
        basis: SubspaceBasis | None = None,
    ) -> None:
        self.module = module.to(device)
        self.device = device
        self.lock = threading.Lock()
        self.microbatches = 0  # accumulated since the last step
        super().__init__(
            dict(module.named_parameters()),
            config,
            confine_module(module, basis) if basis is not None else None,
        )

    def step(self) -> bool:
        """One inner step on the mean of the gradients accumulated since the last; False
        (and no step) if this stage saw no microbatch since then."""
        with self.lock:
            if self.microbatches == 0:
                return False
            for param in self.params.values():
                if param.grad is not None:
                    param.grad.div_(self.microbatches)
            self.optimizer_step()
            self.microbatches = 0
            return True

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        with self.lock:
            super().load_weights(weights)

    def local_weights(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return super().local_weights()


class BlockWorker(SliceTrainer):
    """Stages 1..S−1: forward keeps the input, backward recomputes and returns dL/d(input).

    A training forward may carry a residual scale c ≠ 1 (SkipPipe, see `residual_scale()`):
    it returns h + c(f(h) − h), and its backward differentiates that. Forwards with
    keep=False (inference, held-out loss) always return f(h)."""

    module: BlockStage

    def __init__(
        self,
        module: BlockStage,
        config: InnerConfig,
        device: torch.device,
        basis: SubspaceBasis | None = None,
        saved_ttl_s: float = 300.0,
    ) -> None:
        super().__init__(module, config, device, basis)
        self.saved_ttl_s = saved_ttl_s
        self._saved: dict[
            str, tuple[float, torch.Tensor, float]
        ] = {}  # key → (saved at, input, residual scale)

    @property
    def in_flight(self) -> int:
        return len(self._saved)

    def forward(
        self, key: str, h: torch.Tensor, keep: bool = True, scale: float = 1.0
    ) -> torch.Tensor:
        if not (math.isfinite(scale) and scale > 0.0):
            raise ValueError(f"a residual scale is positive and finite, not {scale}")
        if scale != 1.0 and not keep:
            raise ValueError("only training forwards (keep=True) take a residual scale")
        with self.lock, torch.no_grad(), autocast_context(self.device):
            self._expire()
            h = h.to(self.device)
            if keep:
                self._saved[key] = (time.monotonic(), h, scale)
            return scaled_residual(self.module, h, scale).float().cpu()

    def backward(self, key: str, grad_out: torch.Tensor) -> torch.Tensor:
        with self.lock:
            entry = self._saved.pop(key, None)
            if entry is None:
                raise UnknownMicrobatch(key)
            _, saved, scale = entry
            h = saved.detach().requires_grad_(True)
            with torch.enable_grad(), autocast_context(self.device):
                out = scaled_residual(self.module, h, scale)
            out.backward(grad_out.to(out.device, out.dtype))
            self.microbatches += 1
            return h.grad.float().cpu()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.saved_ttl_s
        for key in [k for k, (t, _, _) in self._saved.items() if t < cutoff]:
            del self._saved[key]


class EdgeWorker(SliceTrainer):
    """Stage 0: embeds a microbatch, computes the loss on what the last stage returns, and
    folds the embedding's gradient in when the gradient of stage 1's input comes back.

    The head's parameter gradients are held per microbatch and added to the accumulated
    gradients only by `commit`, when the whole backward succeeded: a microbatch retried
    through other replicas counts once here."""

    module: EdgeStage

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        with self.lock, torch.no_grad():
            return self.module.embed_tokens(idx.to(self.device)).float().cpu()

    def head(
        self, h: torch.Tensor, targets: torch.Tensor
    ) -> tuple[float, torch.Tensor, list[torch.Tensor | None]]:
        """Loss on the last stage's output, dL/dh, and the head's parameter gradients."""
        with self.lock:
            h = h.to(self.device).detach().requires_grad_(True)
            params = list(self.params.values())
            with torch.enable_grad(), autocast_context(self.device):
                loss = self.module.loss(h, targets.to(self.device))
            grads = torch.autograd.grad(loss, [h, *params], allow_unused=True)
            return float(loss.detach()), grads[0].float().cpu(), list(grads[1:])

    def evaluate_loss(self, h: torch.Tensor, targets: torch.Tensor) -> float:
        with self.lock, torch.no_grad(), autocast_context(self.device):
            return float(self.module.loss(h.to(self.device), targets.to(self.device)))

    def commit(
        self, idx: torch.Tensor, grad_h0: torch.Tensor, head_grads: list[torch.Tensor | None]
    ) -> None:
        """Accumulate one finished microbatch: the head's gradients plus the embedding
        lookup's (dL/dE[t] = Σ of dL/dh0 over the positions holding token t)."""
        with self.lock, torch.no_grad():
            for param, grad in zip(self.params.values(), head_grads, strict=True):
                if grad is None:
                    continue
                param.grad = grad.clone() if param.grad is None else param.grad.add_(grad)
            embed = self.module.embed.weight
            lookup = torch.zeros_like(embed).index_add_(
                0,
                idx.to(embed.device).reshape(-1),
                grad_h0.to(embed.device, embed.dtype).reshape(-1, embed.size(1)),
            )
            embed.grad = lookup if embed.grad is None else embed.grad.add_(lookup)
            self.microbatches += 1
