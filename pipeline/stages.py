"""Splitting the model into pipeline stages.

    stage 0        embedding, final norm, output head, loss (and the data)
    stage 1..S−1   consecutive runs of blocks, as even as possible (earlier stages take
                   the remainder)

A microbatch goes 0 → 1 → … → S−1 → 0 forward (stage 0 embeds it, then computes the
head and the loss) and back S−1 → … → 1 → 0 (stage 0 finishes the embedding's gradient).

Stage modules name their parameters exactly as the whole `Transformer` does
(`embed.weight`, `blocks.3.mlp.up.weight`, `norm.weight`, `lm_head.weight`), so a stage's
slice of the model is a subset of the full model's names: the outer rounds average a
stage's tensors with the same tensors of every full replica, by name (see optim/outer.py, `slices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shoal.train.model import (
    Block,
    EmbeddingView,
    ModelConfig,
    RMSNorm,
    RotaryEmbedding,
    Transformer,
    build_model,
)
from shoal.train.model_parts import run_blocks, untied_head


@dataclass(frozen=True)
class StagePlan:
    """How S stages share a model of `n_layers` blocks."""

    num_stages: int
    n_layers: int

    def __post_init__(self) -> None:
        if not 2 <= self.num_stages <= self.n_layers + 1:
            raise ValueError(
                f"--stages must be in 2..{self.n_layers + 1} "
                f"(stage 0 plus at most one stage per block), got {self.num_stages}"
            )

    def blocks(self, stage: int) -> range:
        """The block indices stage `stage` runs (empty for stage 0)."""
        self._check(stage)
        if stage == 0:
            return range(0)
        per, extra = divmod(self.n_layers, self.num_stages - 1)
        start = (stage - 1) * per + min(stage - 1, extra)
        return range(start, start + per + (1 if stage - 1 < extra else 0))

    def stage_of(self, name: str) -> int:
        """The stage holding parameter `name` of the full model."""
        if name.startswith("blocks."):
            index = int(name.split(".")[1])
            return next(s for s in range(1, self.num_stages) if index in self.blocks(s))
        if name in ("embed.weight", "norm.weight", "lm_head.weight"):
            return 0
        raise ValueError(f"parameter {name!r} belongs to no stage")

    def slices(self, names: list[str]) -> list[list[str]]:
        """The full model's parameter names, grouped by stage (in model order)."""
        groups: list[list[str]] = [[] for _ in range(self.num_stages)]
        for name in names:
            groups[self.stage_of(name)].append(name)
        return groups

    def _check(self, stage: int) -> None:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range 0..{self.num_stages - 1}")


class EdgeStage(nn.Module):
    """Stage 0: token embedding in, final norm + output head (tied, or `lm_head` when the
    config unties it) + loss out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = untied_head(config)  # last, as in Transformer
        self.embedding_view: EmbeddingView | None = None

    embed_tokens = Transformer.embed_tokens  # the model's lookup, view included
    head = Transformer.head  # the model's final norm and projection

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats) of the head's logits on the last stage's output."""
        logits = self.head(h)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class BlockStage(nn.Module):
    """Stages 1..S−1: a run of consecutive blocks on the residual stream. Like
    `Transformer`, `checkpoint_activations = True` recomputes activations in backward."""

    checkpoint_activations: bool = False

    def __init__(self, config: ModelConfig, blocks: range) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleDict({str(i): Block(config) for i in blocks})

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(h.size(1))
        checkpointed = self.checkpoint_activations and self.training
        return run_blocks(self.blocks.values(), h, cos, sin, checkpointed)


def stage_shapes(config: ModelConfig, plan: StagePlan, stage: int) -> dict[str, tuple[int, ...]]:
    """Stage `stage`'s parameter names and shapes (nothing allocated)."""
    with torch.device("meta"):
        module = EdgeStage(config) if stage == 0 else BlockStage(config, plan.blocks(stage))
    return {name: tuple(param.shape) for name, param in module.named_parameters()}


def build_stage(
    config: ModelConfig, plan: StagePlan, stage: int, seed: int, device: str | torch.device = "cpu"
) -> EdgeStage | BlockStage:
    """Stage `stage` of the model with the run's initial weights (bit-identical to the same
    tensors of `build_model(config, seed)`, so stage peers and full replicas start equal).

    The whole model is built once on the CPU to draw those weights in the same order, then
    dropped; a model too large for one host would draw its slice alone (not needed yet)."""
    if plan.n_layers != config.n_layers:
        raise ValueError(
            f"stage plan covers {plan.n_layers} blocks, the model has {config.n_layers}"
        )
    full = build_model(config, seed)
    with torch.device("meta"):
        module: EdgeStage | BlockStage = (
            EdgeStage(config) if stage == 0 else BlockStage(config, plan.blocks(stage))
        )
    module.to_empty(device="cpu")
    source = dict(full.named_parameters())
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(source[name])
    if isinstance(module, BlockStage):
        module.rotary.reset()
    return module.to(device)
