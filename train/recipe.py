"""Per-preset training defaults: what `shoal peer --model X` uses when a flag is not given.

The `small` recipe is tuned for the acceptance demo (`shoal demo --peers 3 --rounds 6` on
a 2-core CPU: held-out loss <= 2.8 nats within 8 minutes) with scripts/tune_small.py,
which simulates that run in one process. Measured on the 2-core dev box (torch 2.13 CPU,
1 thread, int8 pseudo-gradients, 3 replicas, 6 rounds, sequential):

    python scripts/tune_small.py                 # seed 0: eval 2.80 2.45 2.20 2.00 1.82 1.72, 233 s
    python scripts/tune_small.py --seed 1        # eval 2.79 2.48 2.18 1.99 1.86 1.76, 204 s

(~0.22 s per inner step per replica; three single-thread processes sharing 2 cores take
~0.34 s per step, so the demo's compute is ~2 minutes.) H=75 reaches 1.59 in 287 s; H=30
1.95 in 126 s: H=50 keeps a wide margin on both the loss (<= 2.8) and the time (< 8 min). The GPU
presets follow the usual small-LM practice (lower lr as width grows, H as in DiLoCo's
follow-ups) and are starting points, not tuned results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """Inner-loop defaults for one model preset (AdamW betas 0.9/0.95, wd 0.1, clip 1.0
    come from InnerConfig and are the same for every preset)."""

    batch_size: int  # sequences per inner step
    seq_len: int  # bytes per sequence (<= the preset's max_seq_len)
    inner_lr: float  # AdamW peak lr, constant after warmup
    warmup_steps: int  # linear warmup, counted over the whole run (not per round)
    inner_steps: int  # H: inner steps per outer round
    eval_batches: int = 8  # held-out batches of (batch_size, seq_len) per evaluation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(batch_size=8, seq_len=64, inner_lr=3e-3, warmup_steps=5, inner_steps=10),
    "tiny-deep": Recipe(batch_size=8, seq_len=64, inner_lr=3e-3, warmup_steps=5, inner_steps=10),
    "small": Recipe(batch_size=16, seq_len=128, inner_lr=2e-3, warmup_steps=20, inner_steps=50),
    "small-deep": Recipe(
        batch_size=16, seq_len=128, inner_lr=2e-3, warmup_steps=20, inner_steps=50
    ),
    "base": Recipe(batch_size=32, seq_len=512, inner_lr=1e-3, warmup_steps=200, inner_steps=100),
    "large": Recipe(batch_size=32, seq_len=1024, inner_lr=6e-4, warmup_steps=500, inner_steps=100),
    "llama-125m": Recipe(
        batch_size=16, seq_len=1024, inner_lr=6e-4, warmup_steps=500, inner_steps=100
    ),
}
