"""Outer optimizers by name: a new algorithm is a new file plus a line here."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shoal.optim.diloco import DiLoCo
from shoal.optim.outer import OuterConfig, OuterOptimizer

OUTER_OPTIMIZERS: dict[str, type[OuterOptimizer]] = {"diloco": DiLoCo}


def build_outer(outer_weights: Mapping[str, torch.Tensor], config: OuterConfig) -> OuterOptimizer:
    try:
        cls = OUTER_OPTIMIZERS[config.name]
    except KeyError:
        raise ValueError(f"--outer {config.name!r} is not one of {sorted(OUTER_OPTIMIZERS)}") from None
    return cls(outer_weights, config)
