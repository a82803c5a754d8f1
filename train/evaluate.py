"""Held-out loss: the number every peer reports after each outer round.

All peers evaluate the same fixed batches (ByteData.eval_batches) on the same outer
weights, so their numbers agree up to device arithmetic and can be compared on the
dashboard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shoal.train.device import autocast_context


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> float:
    """Mean cross-entropy in nats per byte over `batches` (token-weighted, so uneven
    batches count fairly). The model is put in eval mode and its previous mode restored,
    so this can run between inner steps."""
    if not batches:
        raise ValueError("evaluate needs at least one batch")
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast_context(device):
                _, loss = model(x, y)
            total += float(loss) * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count
