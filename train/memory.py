"""A peer's memory plan: bytes per component on each device, printed at start-up so that a
volunteer sees before the first step whether a model fits.

The training device holds the inner model: fp32 weights, their gradients, AdamW's two
moments, and the activations of one batch. The activation estimate follows Korthikanti et
al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"): a transformer
layer keeps about 34·s·b·h bytes of 16-bit activations for the backward pass when the
attention scores are never materialised (a fused attention kernel, as
`scaled_dot_product_attention` uses on a GPU); full recomputation keeps only each block's
input (2·s·b·h bytes) plus one block's activations while it is recomputed. The loss adds
fp32 logits and their gradient (2·4·s·b·V bytes). On a CPU, values are fp32: twice that.
The outer state (outer weights, momentum, error feedback) and the snapshot this peer
serves stay in CPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.train.model import ModelConfig

KORTHIKANTI_BYTES_PER_TOKEN_AND_WIDTH = 34  # per layer, 16-bit values, fused attention


@dataclass(frozen=True)
class MemoryLine:
    component: str
    device: str
    bytes: int


def activation_bytes(
    config: ModelConfig, batch: int, seq: int, value_bytes: int, checkpointing: bool
) -> int:
    """Activations one batch of (batch, seq) tokens keeps for its backward pass (estimate)."""
    tokens_width = batch * seq * config.d_model
    layer = KORTHIKANTI_BYTES_PER_TOKEN_AND_WIDTH * tokens_width * value_bytes // 2
    if checkpointing:
        layers = config.n_layers * tokens_width * value_bytes + layer
    else:
        layers = config.n_layers * layer
    return layers + 2 * 4 * batch * seq * config.vocab_size


def memory_plan(
    config: ModelConfig,
    inner_params: int,
    batch: int,
    seq: int,
    device: str,
    checkpointing: bool,
    outer_bytes: int,
    snapshot_bytes: int,
) -> list[MemoryLine]:
    """The plan of a peer training `inner_params` weights of `config` on `device`."""
    weights = 4 * inner_params
    value_bytes = 2 if device.startswith("cuda") else 4  # bf16 autocast on CUDA
    return [
        MemoryLine("inner weights (fp32)", device, weights),
        MemoryLine("gradients (fp32)", device, weights),
        MemoryLine("AdamW moments (fp32)", device, 2 * weights),
        MemoryLine(
            "activations of one batch (estimate)",
            device,
            activation_bytes(config, batch, seq, value_bytes, checkpointing),
        ),
        MemoryLine("outer weights and optimizer state", "cpu", outer_bytes),
        MemoryLine("snapshot served to joiners", "cpu", snapshot_bytes),
    ]


def format_plan(lines: list[MemoryLine]) -> str:
    """The plan as a small table, with a total per device."""
    totals: dict[str, int] = {}
    for line in lines:
        totals[line.device] = totals.get(line.device, 0) + line.bytes
    rows = [
        f"  {line.component:38s} {line.device:8s} {line.bytes / 2**20:10.1f} MiB" for line in lines
    ]
    rows += [f"  {'total':38s} {dev:8s} {total / 2**20:10.1f} MiB" for dev, total in totals.items()]
    return "\n".join(rows)
