"""SkipPipe's eval loss at equal tokens, in one process and in minutes: a proxy for the
loss half of `scripts/bench_skippipe.py` (which runs 11 peer processes for ~17 minutes),
for trying path policies quickly.

    python scripts/sim_skippipe.py --steps 400 --out results/sim_skippipe.json

Model `small-deep` (10 blocks) cut as the benchmark cuts it: stage 0 = embedding, final
norm and head; 5 block stages of 2 blocks. Each inner step takes a batch of the recipe's
size, cuts it into microbatches (2 sequences each, as the benchmark), and sends every
microbatch along a path; each stage then takes the runtime's inner step on its own slice
(`pipeline.worker.SliceTrainer.step`: the gradients averaged over the microbatches that
visited the stage, clipped per slice, AdamW at the recipe's warmup-then-constant learning
rate), on the slices and initial weights the runtime builds (`pipeline.stages`).

Paths (`--variants`, any of):
* `full`: every block stage, in order;
* `skip`: 3 of the 5 block stages (SkipPipe's default 4 of 6 stages, stage 0 counted):
  stage 1, which the runtime keeps on every path (`--skip-keep 1`), and a uniformly random
  2 of stages 2-5; then, in path order, each pair of visited stages s, s+1 swapped with
  probability 1/2, at most 2 disjoint pairs (the scheduler's swap rule; where it swaps
  depends on timing, not on a coin);
* `skip-in-order`: the same stages, never swapped;
* `skip-keep-none`, `skip-keep-none-in-order`: a uniformly random 3 of the 5 block stages
  (`--skip-keep none`), with and without swaps;
* `skip-rescaled`, `skip-in-order-rescaled`: `skip` and `skip-in-order` with the runtime's
  residual rescaling (`--skip-rescale`, `pipeline.worker.residual_scale`): in training
  forwards a stage visited with probability p < 1 adds its residual update scaled by
  p^-1/2 (`--rescale sqrt`) or 1/p (`--rescale inverse`), h + c(f(h) - h); held-out
  forwards are unscaled.

What it leaves out, against the benchmark: the network, the outer rounds (one replica
per stage here, two averaging by DiLoCo int8 there), the activation codec, and the
scheduler's speed-aware choice of paths (random here, so every stage is visited equally).
The held-out loss is reported through the full path and through stages 1, 3, 5 only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from shoal.optim.inner import InnerConfig
from shoal.pipeline.skippipe import SkipPipeConfig
from shoal.pipeline.stages import StagePlan, build_stage
from shoal.pipeline.worker import SliceTrainer, residual_scale, scaled_residual
from shoal.train import PRESETS, RECIPES
from shoal.train.data import ByteData, load_corpus

MODEL = "small-deep"
BLOCK_STAGES, VISITS, MICROBATCH = 5, 3, 2
VARIANTS = (
    "full",
    "skip",
    "skip-in-order",
    "skip-keep-none",
    "skip-keep-none-in-order",
    "skip-rescaled",
    "skip-in-order-rescaled",
)
MAX_SWAPS = 2


def route(variant: str, rng: random.Random) -> list[int]:
    variant = variant.removesuffix("-rescaled")
    if variant == "full":
        return list(range(1, BLOCK_STAGES + 1))
    kept = [] if variant.startswith("skip-keep-none") else [1]
    free = [s for s in range(1, BLOCK_STAGES + 1) if s not in kept]
    stages = sorted(kept + rng.sample(free, VISITS - len(kept)))
    if not variant.endswith("in-order"):
        i = swaps = 0
        while i + 1 < len(stages) and swaps < MAX_SWAPS:
            if (
                stages[i + 1] == stages[i] + 1
                and not {stages[i], stages[i + 1]} & set(kept)
                and rng.random() < 0.5
            ):
                stages[i], stages[i + 1] = stages[i + 1], stages[i]
                i, swaps = i + 2, swaps + 1
            else:
                i += 1
    return stages


def train(
    variant: str, steps: int, seed: int, eval_batches: int, threads: int, rescale: str
) -> dict:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    recipe, config = RECIPES[MODEL], PRESETS[MODEL]
    plan = StagePlan(BLOCK_STAGES + 1, config.n_layers)
    stages = {
        s: build_stage(config, plan, s, seed) for s in range(plan.num_stages)
    }  # the runtime's slices and init
    edge = stages[0]
    data = ByteData(load_corpus(None))
    batches = data.train_batches("peer-0", recipe.batch_size, recipe.seq_len, seed)
    held_out = data.eval_batches(recipe.batch_size, recipe.seq_len, eval_batches)
    inner = InnerConfig(
        lr=recipe.inner_lr,
        warmup_steps=recipe.warmup_steps,
        batch_size=recipe.batch_size,
        seq_len=recipe.seq_len,
    )
    trainers = {s: SliceTrainer(module, inner, torch.device("cpu")) for s, module in stages.items()}
    rng = random.Random(seed)
    kept = () if "keep-none" in variant else (1,)
    share = SkipPipeConfig(
        num_stages=BLOCK_STAGES + 1, stages_per_path=VISITS + 1, always_visit=kept
    ).visit_share
    c = residual_scale(rescale if variant.endswith("-rescaled") else "none", share)
    scale = {s: 1.0 if s in kept else c for s in range(1, BLOCK_STAGES + 1)}

    def loss_along(
        x: torch.Tensor, y: torch.Tensor, path: list[int], training: bool = True
    ) -> torch.Tensor:
        h = edge.embed_tokens(x)
        for stage in path:
            h = scaled_residual(stages[stage], h, scale[stage] if training else 1.0)
        return edge.loss(h, y)

    def evaluate(path: list[int]) -> float:
        with torch.no_grad():
            return sum(
                float(loss_along(torch.as_tensor(x), torch.as_tensor(y), path, training=False))
                for x, y in held_out
            ) / len(held_out)

    curve, begin = [], time.monotonic()
    for step in range(steps):
        x, y = (torch.as_tensor(t) for t in next(batches))
        for first in range(0, x.size(0), MICROBATCH):
            visited = route(variant, rng)
            for stage in (0, *visited):
                trainers[stage].microbatches += 1
            loss_along(
                x[first : first + MICROBATCH], y[first : first + MICROBATCH], visited
            ).backward()
        for trainer in trainers.values():
            # the runtime's stage step: the mean over the microbatches it saw, if any
            trainer.step()
        if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
            curve.append(
                {
                    "step": step + 1,
                    "tokens": (step + 1) * recipe.batch_size * recipe.seq_len,
                    "eval_loss": evaluate(list(range(1, BLOCK_STAGES + 1))),
                }
            )
            print(
                f"   {variant}: step {step + 1}, eval {curve[-1]['eval_loss']:.4f} "
                f"({time.monotonic() - begin:.0f} s)",
                flush=True,
            )
    return {
        "final_eval_loss": curve[-1]["eval_loss"],
        "eval_loss_stages_1_3_5": evaluate([1, 3, 5]),
        "curve": curve,
        "seconds": time.monotonic() - begin,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rescale",
        choices=("sqrt", "inverse"),
        default="sqrt",
        help="the residual scale of the *-rescaled variants: p^-1/2 or 1/p",
    )
    parser.add_argument("--out", default="results/sim_skippipe.json")
    args = parser.parse_args()
    results = {}
    for variant in args.variants:
        print(f"== {variant}: {args.steps} steps", flush=True)
        results[variant] = train(
            variant, args.steps, args.seed, args.eval_batches, args.threads, args.rescale
        )
    base = results.get("full")
    print(f"{'paths':<22} {'final eval':>10} {'vs full':>8} {'stages 1,3,5':>12}")
    for variant, row in results.items():
        if base:
            row["vs_full"] = row["final_eval_loss"] / base["final_eval_loss"] - 1
        versus = f"{100 * row['vs_full']:+7.1f}%" if base else f"{'-':>8}"
        print(
            f"{variant:<22} {row['final_eval_loss']:10.4f} {versus} "
            f"{row['eval_loss_stages_1_3_5']:12.4f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python scripts/sim_skippipe.py " + " ".join(sys.argv[1:]),
                "model": MODEL,
                "results": results,
            },
            indent=1,
        )
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
