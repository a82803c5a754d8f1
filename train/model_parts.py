"""Pieces of the model that the whole `Transformer` (train/model.py) and the pipeline's
stage modules (pipeline/stages.py) share, so a stage computes exactly what the model does:
the untied output head and the loop that runs a stretch of blocks.

They live apart from model.py only to keep that file readable at a glance."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from shoal.train.model import ModelConfig


def untied_head(config: ModelConfig) -> nn.Linear | None:
    """The output head's own matrix (vocab_size × d_model, named `lm_head.weight`), or None
    for a tied model. Shared by `Transformer` and pipeline/stages.py's `EdgeStage`, which
    both register it last so it follows `norm.weight` in parameter order."""
    if config.tie_embeddings:
        return None
    return nn.Linear(config.d_model, config.vocab_size, bias=False)


def run_blocks(
    blocks: Iterable[nn.Module],
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    checkpointed: bool = False,
) -> torch.Tensor:
    """Run blocks in order on the residual stream h. `checkpointed` keeps only each block's
    input for the backward pass and recomputes the rest then (activation checkpointing:
    about one extra forward of compute for far less GPU memory at long sequences). The
    non-reentrant form is used because it supports inputs that need no grad and autocast."""
    for block in blocks:
        if checkpointed:
            h = checkpoint(block, h, cos, sin, use_reentrant=False)
        else:
            h = block(h, cos, sin)
    return h
