"""Inner loop glue: H AdamW steps of one replica on its own data.

The AdamW state persists across outer rounds (as in DiLoCo); after each outer step the
replica's weights are overwritten with the new outer weights. Runs on the training
thread, never on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch build without torch.distributed: no parameter is sharded
    DTensor = ()  # type: ignore[assignment,misc]

from shoal.train.device import autocast_context
from shoal.train.evaluate import evaluate


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a parameter sharded by FSDP (a DTensor) is gathered from its ranks
    (a collective: every rank of the peer makes the same call)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor, on every rank) as `param` holds it: this rank's shard of a
    DTensor, cut locally."""
    value = value.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


@dataclass(frozen=True)
class InnerConfig:
    """Inner-optimizer settings every peer of a run shares."""

    lr: float = 4e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float = 1.0
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1  # batches whose gradients make one step (--batch-tokens)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--inner-lr must be positive, got {self.lr}")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("--batch-size must be >= 1 and --seq-len >= 2")
        if self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError("grad_accum must be >= 1 and --warmup-steps >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int) -> float:
        """Linear warmup over the run's first `warmup_steps`, then constant."""
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr

    def optimizer(self, params) -> torch.optim.AdamW:
        return torch.optim.AdamW(
            params, lr=self.lr, betas=(self.beta1, self.beta2), weight_decay=self.weight_decay
        )


@dataclass
class InnerStats:
    steps: int
    tokens: int
    seconds: float
    train_loss: float  # mean over the steps of this phase

    def __add__(self, other: InnerStats) -> InnerStats:
        """Two phases as one (Streaming DiLoCo's overlapped steps plus the rest). With no
        step in either, the later phase's loss (a stage peer's is the driver's last)."""
        steps = self.steps + other.steps
        losses = [(s.train_loss, s.steps) for s in (self, other) if s.steps]
        mean = sum(loss * n for loss, n in losses) / steps if steps else other.train_loss
        return InnerStats(steps, self.tokens + other.tokens, self.seconds + other.seconds, mean)


class Constraint(Protocol):
    """A set the weights must stay in, kept by projected gradient descent (e.g. the
    subspace confinement of pipeline/subspace.py): gradients projected before each step,
    weights after it and after every outer update; and a learning-rate factor per
    parameter (1 for the rest), for parameters the projection changes the step size of."""

    def grads(self, params: Mapping[str, torch.Tensor]) -> object: ...

    def weights(self, params: Mapping[str, torch.Tensor]) -> object: ...

    def lr_scales(self, params: Mapping[str, torch.Tensor]) -> Mapping[str, float]: ...


class ParamTrainer:
    """Parameters, AdamW with the run's schedule, and the weights the outer rounds read
    and write; shared by full replicas (InnerTrainer) and pipeline stages."""

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        config: InnerConfig,
        constraint: Constraint | None = None,
    ) -> None:
        self.params = params
        self.config = config
        self.constraint = constraint
        self.optimizer = config.optimizer(self._param_groups())
        self.step_count = 0
        self._grad_norm: torch.Tensor | None = None
        self._outer_offset: dict[str, torch.Tensor] = {}
        if constraint is not None:
            self.load_weights({n: p.detach().clone() for n, p in self.params.items()})

    def restart(self, config: InnerConfig, step: int) -> None:
        """Fresh optimizer state under `config`, continuing the schedule at `step`."""
        self.config, self.step_count = config, step
        self.optimizer = config.optimizer(self._param_groups())

    def _param_groups(self) -> list[dict]:
        """One AdamW group per learning-rate factor of the constraint (`lr_scale`)."""
        scales = self.constraint.lr_scales(self.params) if self.constraint is not None else {}
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, param in self.params.items():
            groups.setdefault(float(scales.get(name, 1.0)), []).append(param)
        return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]

    @property
    def last_grad_norm(self) -> float | None:
        """The norm of the last step's gradients before clipping (None before the first)."""
        return None if self._grad_norm is None else float(self._grad_norm)

    def optimizer_step(self) -> None:
        """Step on the gradients in `.grad` (then cleared)."""
        if self.constraint is not None:
            self.constraint.grads(self.params)
        # the norm before clipping, for CheckFree's rebuild weights (inf: measure, never clip);
        # kept as a tensor so that the step does not wait for the device to read it
        self._grad_norm = torch.nn.utils.clip_grad_norm_(
            self.params.values(), self.config.grad_clip or math.inf
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(self.step_count) * group["lr_scale"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.constraint is not None:
            self.constraint.weights(self.params)

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Continue from `weights` (the outer weights after a round). Under a constraint the
        weights are projected, and the part projected away is remembered so that
        `local_weights` reports progress relative to the projection: the pseudo-gradient is
        then P(θ) − θ_local, this replica's training, not a pull of the shared weights
        toward the constraint set."""
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(_like(weights[name], param))
            if self.constraint is not None:
                self.constraint.weights(self.params)
                self._outer_offset = {
                    n: weights[n].to("cpu", torch.float32) - p.detach().to("cpu", torch.float32)
                    for n, p in self.params.items()
                }

    def local_weights(self) -> dict[str, torch.Tensor]:
        local = {
            n: _full(p.detach()).to("cpu", torch.float32).clone() for n, p in self.params.items()
        }
        for name, offset in self._outer_offset.items():
            local[name].add_(offset)
        return local


class InnerTrainer(ParamTrainer):
    def __init__(
        self,
        model: torch.nn.Module,
        config: InnerConfig,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
        constraint: Constraint | None = None,
        compile: bool = False,
        wrap: Callable | None = None,
    ) -> None:
        """`wrap`: what the steps call instead of the model (DDP around it, or the model
        sharded in place by FSDP); the parameters keep the model's own names."""
        self.model = model.to(device)
        self.batches = batches
        self.device = device
        # torch.compile wraps the module and shares its parameters; evaluation keeps the
        # plain module (its batches have another shape, which would compile again)
        forward = wrap or self.model
        self.forward = torch.compile(forward) if compile else forward
        super().__init__(dict(self.model.named_parameters()), config, constraint)

    def evaluate(self, batches) -> float:
        """Held-out loss of the current local weights."""
        return evaluate(self.model, batches, self.device)

    def run(self, steps: int, on_step: Callable[[int, float], None] | None = None) -> InnerStats:
        """Train `steps` steps; `on_step(step_count, loss)` is called after each (for metrics)."""
        self.model.train()
        start, losses, tokens = time.perf_counter(), [], 0
        accum = self.config.grad_accum
        for _ in range(steps):
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(accum):  # gradients of `accum` batches sum into one step
                x, y = next(self.batches)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with autocast_context(self.device):
                    _, loss = self.forward(x, y)
                (loss if accum == 1 else loss / accum).backward()
                step_loss += float(loss.detach()) / accum
                tokens += x.numel()
            self.optimizer_step()
            value = step_loss
            losses.append(value)
            if on_step is not None:
                on_step(self.step_count, value)
        seconds = time.perf_counter() - start
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        return InnerStats(steps=steps, tokens=tokens, seconds=seconds, train_loss=mean_loss)
