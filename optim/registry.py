"""Outer optimizers by name: a new algorithm is a new file plus a line here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from shoal.optim.diloco import DiLoCo
from shoal.optim.noloco import NoLoCo
from shoal.optim.outer import OuterConfig, OuterOptimizer
from shoal.optim.sparseloco import SparseLoCo
from shoal.optim.streaming import StreamingDiLoCo

OUTER_OPTIMIZERS: dict[str, type[OuterOptimizer]] = {
    "diloco": DiLoCo,
    "sparseloco": SparseLoCo,
    "noloco": NoLoCo,
    "streaming": StreamingDiLoCo,
}

# Per-algorithm defaults (DESIGN.md): what a flag left unset means for each optimizer.
OUTER_DEFAULTS: dict[str, dict[str, Any]] = {
    "diloco": {"lr": 0.7, "momentum": 0.9, "codec": "int8"},
    "sparseloco": {"lr": 1.0, "momentum": 0.0, "codec": "topk"},
    "noloco": {"lr": 0.7, "momentum": 0.5, "codec": "int8"},
    "streaming": {
        "lr": 0.7,
        "momentum": 0.9,
        "codec": "q4",
        "fragments": 4,
        "overlap": 5,
        "mix": 0.5,
    },
}


def outer_config(name: str, **overrides: Any) -> OuterConfig:
    """The OuterConfig for `name`, its defaults overridden by the non-None `overrides`."""
    if name not in OUTER_OPTIMIZERS:
        raise ValueError(f"--outer {name!r} is not one of {sorted(OUTER_OPTIMIZERS)}")
    settings = {
        **OUTER_DEFAULTS.get(name, {}),
        **{k: v for k, v in overrides.items() if v is not None},
    }
    return OuterConfig(name=name, **settings)


def build_outer(
    outer_weights: Mapping[str, torch.Tensor],
    config: OuterConfig,
    slices: Sequence[Sequence[str]] | None = None,
) -> OuterOptimizer:
    """The run's outer optimizer over `outer_weights` (a whole model, or one stage's slice
    of it when `slices` partitions the model into pipeline stages)."""
    try:
        cls = OUTER_OPTIMIZERS[config.name]
    except KeyError:
        raise ValueError(
            f"--outer {config.name!r} is not one of {sorted(OUTER_OPTIMIZERS)}"
        ) from None
    return cls(outer_weights, config, slices) if slices is not None else cls(outer_weights, config)
