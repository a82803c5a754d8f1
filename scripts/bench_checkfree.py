"""Stage recovery after failures: CheckFree, CheckFree+, checkpoint/rollback and re-init,
compared by held-out loss against wall-clock on the same model, data, seeds and failures.

    python scripts/bench_checkfree.py                       # defaults: ~5 min on 2 CPU cores
    python scripts/bench_checkfree.py --rates 0 1 3 --seeds 0 1 2 --where intermediate

Failures are SIMULATED: one pipeline replica (stage 0 = embedding/head/loss, block stages
1..S−1, pipeline/stages.py) runs in this one process, and "stage i lost all its peers"
means its weights and AdamW state are dropped; nothing is killed, no bytes cross a network.
Recovery in the real runtime (fetching neighbours' weights over HTTP) is exercised by the
swarm tests, not here. A step = forward/backward of one batch along the step's path, then
each stage's own ParamTrainer steps (per-stage AdamW and clipping, as on a stage peer).

Methods (CheckFree: arXiv 2506.15461, pipeline/checkfree.py):
* `checkfree`: lost stage i ← rebuild_stage(i−1, i+1) weighted by their last pre-clip
  gradient norms; fresh AdamW at lr × RECOVERY_LR_SCALE.
* `checkfree+`: the same, and --swap-fraction of the steps run block stages 1↔2 and
  S−2↔S−1 swapped, so a lost edge block stage is rebuilt as a copy of its block neighbour.
* `checkpoint`: every --checkpoint-every steps all stages' weights and AdamW states are
  written (safetensors + JSON, atomic, fsync'd: peer/checkpoint.py) to a temporary folder;
  a failure rolls every stage back to the latest one and the lost steps are recomputed.
* `reinit`: the lost stage restarts from fresh random weights (new seed) and fresh AdamW.
* `no-failure`: the reference, once per seed, shown in every table.

--rates are expected failures per 100 computed steps (each computed step, recomputed ones
included, fails with probability rate/100). The schedule is drawn once per (rate, seed) and
reused for every method; a failure hits one block stage drawn from `--where`:
`intermediate` (2..S−2: all four methods) or `edge` (1, S−1: checkfree+, checkpoint,
reinit). Rate 0 shows each method's failure-free cost (saves, out-of-order steps).

Wall-clock = measured seconds (time.perf_counter) of every step computed, recomputed ones
included, + measured recovery work (rebuild, re-init, checkpoint saves and loads). Eval
(every --eval-every steps and right after each recovery) is not counted. Target: the
no-failure eval loss at --target-fraction of its steps, per seed (or --target-loss); time
to target = clock at the first eval point at or below it (also given in computed steps,
which timing noise cannot move), averaged over the seeds that reach it. A run that has not
reached the target after --steps goes on until it does, up to 2 × --steps of progress (a
checkpoint run computes more steps for the same progress: no method is cut off earlier
than another); the final loss is read at --steps. `jump` = eval loss
right after a recovery minus right before the failure. Writes JSON (--out) and a PNG
beside it; prints a table (means over seeds).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shoal.optim.inner import InnerConfig, ParamTrainer
from shoal.peer.checkpoint import load_latest, save_checkpoint
from shoal.pipeline.checkfree import rebuild_stage, recovered_trainer, recovery_source
from shoal.pipeline.paths import FullPaths
from shoal.pipeline.stages import BlockStage, StagePlan, build_stage
from shoal.train import PRESETS, RECIPES, ByteData, ModelConfig, load_corpus

METHODS = {
    "intermediate": ["checkfree", "checkfree+", "checkpoint", "reinit"],
    "edge": ["checkfree+", "checkpoint", "reinit"],
}
COLORS = {
    "no-failure": "black",
    "checkfree": "tab:blue",
    "checkfree+": "tab:green",
    "checkpoint": "tab:red",
    "reinit": "tab:purple",
}


@dataclasses.dataclass
class Setup:
    """What every run shares: model, plan, optimizer settings, data and schedule knobs."""

    args: argparse.Namespace
    seed: int
    config: ModelConfig
    plan: StagePlan
    inner: InnerConfig
    initial: list[torch.nn.Module]
    batches: list[
        tuple[torch.Tensor, torch.Tensor]
    ]  # batch k is trained at step k, also when recomputed
    eval_set: list[tuple[torch.Tensor, torch.Tensor]]


class Pipeline:
    """One replica's S stages in this process, each with its own ParamTrainer."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.stages = copy.deepcopy(setup.initial)
        self.trainers = [ParamTrainer(dict(m.named_parameters()), setup.inner) for m in self.stages]
        self.grad_norms = [math.nan] * len(self.stages)  # last pre-clip norm per stage

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], path: list[int]) -> None:
        x, y = batch
        h = self.stages[0].embed_tokens(x)
        for stage in path:
            h = self.stages[stage](h)
        self.stages[0].loss(h, y).backward()
        for stage, trainer in enumerate(self.trainers):
            trainer.optimizer_step()
            self.grad_norms[stage] = (
                trainer.last_grad_norm
            )  # before clipping, as a stage peer gossips it

    @torch.no_grad()
    def evaluate(self) -> float:
        total, count = 0.0, 0
        for x, y in self.setup.eval_set:
            h = self.stages[0].embed_tokens(x)
            for stage in range(1, len(self.stages)):
                h = self.stages[stage](h)
            total += float(self.stages[0].loss(h, y)) * y.numel()
            count += y.numel()
        return total / count

    def save(self, directory: Path, step: int) -> None:
        tensors = {}
        for stage, trainer in enumerate(self.trainers):
            for name, param in trainer.params.items():
                tensors[f"{stage}/{name}"] = param.detach()
                for key, value in trainer.optimizer.state.get(param, {}).items():
                    tensors[f"{stage}/{name}/{key}"] = value
        save_checkpoint(directory, step, tensors, {"step": step}, keep=2)

    def load(self, directory: Path) -> int:
        """Every stage back to the latest checkpoint (weights, AdamW state, schedule step)."""
        tensors, manifest = load_latest(directory)
        step = manifest["step"]
        for stage, module in enumerate(self.stages):
            trainer = ParamTrainer(dict(module.named_parameters()), self.setup.inner)
            trainer.load_weights({n: tensors[f"{stage}/{n}"] for n in trainer.params})
            for name, param in trainer.params.items():
                state = {
                    k: tensors[f"{stage}/{name}/{k}"]
                    for k in ("step", "exp_avg", "exp_avg_sq")
                    if f"{stage}/{name}/{k}" in tensors
                }
                if state:
                    trainer.optimizer.state[param] = state
            trainer.step_count = step
            self.trainers[stage] = trainer
        return step


def path_of(method: str, step: int, setup: Setup) -> list[int]:
    """Block stages in visiting order; CheckFree+ swaps 1↔2 and S−2↔S−1 on an evenly
    spaced --swap-fraction of the steps (out-of-order training, arXiv 2506.15461 §4), the
    runtime's routes (`pipeline.paths.FullPaths`) with a step in place of a microbatch."""
    paths = FullPaths(
        setup.plan.num_stages, setup.args.swap_fraction if method == "checkfree+" else 0.0
    )
    return [stage for stage, _ in paths.route(swapped=paths.is_swapped(step))]


def recover(
    method: str,
    pipe: Pipeline,
    stage: int,
    step: int,
    failure_index: int,
    checkpoint_dir: Path | None,
) -> int:
    """Recover from losing `stage` (its weights and AdamW state) after `step` steps; returns
    the step to continue from. The lost stage gets a new module and a new trainer."""
    setup, plan = pipe.setup, pipe.setup.plan
    if method == "checkpoint":
        return pipe.load(checkpoint_dir)
    if method == "reinit":
        module = build_stage(setup.config, plan, stage, seed=setup.seed + 1000 + failure_index)
        trainer = ParamTrainer(dict(module.named_parameters()), setup.inner)
        trainer.step_count = step  # the lr schedule goes on where the run is
    else:
        live = [s for s in range(plan.num_stages) if s != stage]
        mode, sources = recovery_source(plan, stage, live)
        if mode == "none":
            raise RuntimeError(f"{method} cannot rebuild stage {stage} (neighbours {sources})")
        prev, nxt = stage - 1, stage + 1
        weights = rebuild_stage(
            plan,
            stage,
            dict(pipe.stages[prev].named_parameters()) if prev in sources else None,
            dict(pipe.stages[nxt].named_parameters()) if nxt in sources else None,
            pipe.grad_norms[prev] if prev in sources else None,
            pipe.grad_norms[nxt] if nxt in sources else None,
        )
        module = BlockStage(setup.config, plan.blocks(stage))
        module.load_state_dict(weights)
        trainer = recovered_trainer(
            dict(module.named_parameters()), setup.inner, step_count=step
        )  # lr × 1.1
    pipe.stages[stage], pipe.trainers[stage] = module, trainer
    return step


def run(method: str, setup: Setup, failures: dict[int, int], target: float | None = None) -> dict:
    """Train --steps steps of progress with `method`; `failures` maps computed step → stage.
    With a `target`, a run that has not reached it by then goes on (up to twice --steps of
    progress) until it does, so that no method's time to target is cut off by a shorter
    horizon than another's (a checkpoint run computes more steps for the same progress)."""
    args = setup.args
    pipe = Pipeline(setup)
    step = computed = recomputed = high_water = 0
    clock_s = recovery_s = 0.0
    events, curve = [], [{"step": 0, "computed": 0, "seconds": 0.0, "eval_loss": pipe.evaluate()}]
    with tempfile.TemporaryDirectory(prefix="shoal-checkfree-") as tmp:
        checkpoint_dir = Path(tmp) if method == "checkpoint" else None
        if checkpoint_dir is not None:
            start = time.perf_counter()
            pipe.save(checkpoint_dir, 0)
            recovery_s += time.perf_counter() - start
        final_eval = None
        while step < args.steps or (
            target is not None
            and step < 2 * args.steps
            and min(p["eval_loss"] for p in curve) > target
        ):
            start = time.perf_counter()
            pipe.step(setup.batches[step], path_of(method, step, setup))
            clock_s += time.perf_counter() - start
            step, computed = step + 1, computed + 1
            if step <= high_water:
                recomputed += 1
            high_water = max(high_water, step)
            if step % args.eval_every == 0 or step == args.steps:
                curve.append(
                    {
                        "step": step,
                        "computed": computed,
                        "seconds": clock_s + recovery_s,
                        "eval_loss": pipe.evaluate(),
                    }
                )
                if step == args.steps:
                    final_eval = curve[-1]["eval_loss"]
            if (
                checkpoint_dir is not None
                and step % args.checkpoint_every == 0
                and step < args.steps
            ):
                start = time.perf_counter()
                pipe.save(checkpoint_dir, step)
                recovery_s += time.perf_counter() - start
            if computed in failures:
                stage, eval_before = failures[computed], pipe.evaluate()
                start = time.perf_counter()
                resumed = recover(method, pipe, stage, step, len(events), checkpoint_dir)
                seconds = time.perf_counter() - start
                recovery_s, step = recovery_s + seconds, resumed
                curve.append(
                    {
                        "step": step,
                        "computed": computed,
                        "seconds": clock_s + recovery_s,
                        "eval_loss": pipe.evaluate(),
                        "after_failure": True,
                    }
                )
                events.append(
                    {
                        "computed_step": computed,
                        "stage": stage,
                        "resumed_at": resumed,
                        "recovery_s": seconds,
                        "eval_before": eval_before,
                        "eval_after": curve[-1]["eval_loss"],
                    }
                )
    return {
        "failures": events,
        "curve": curve,
        "train_seconds": clock_s,
        "recovery_seconds": recovery_s,
        "wall_seconds": clock_s + recovery_s,
        "computed_steps": computed,
        "recomputed_steps": recomputed,
        "final_eval_loss": final_eval,
    }  # at --steps of progress (the last time it got there)


def failure_schedule(rate: float, seed: int, eligible: list[int], horizon: int) -> dict[int, int]:
    """Computed step → lost stage. The steps depend on (rate, seed) only, so the intermediate
    and edge tables share them; a uniform draw per failure picks the stage from `eligible`."""
    rng = np.random.default_rng([seed, round(rate * 1000)])
    hits = rng.random(horizon) < rate / 100
    picks = rng.random(horizon)
    return {k + 1: eligible[int(picks[k] * len(eligible))] for k in np.flatnonzero(hits)}


def reach(row: dict, target: float) -> None:
    """Clock seconds and computed steps at the first eval point at or below `target`
    (steps are free of timing noise: CPU runs are deterministic given the seed)."""
    first = next((p for p in row["curve"] if p["eval_loss"] <= target), None)
    row["time_to_target_s"] = None if first is None else first["seconds"]
    row["steps_to_target"] = None if first is None else first["computed"]


def summarize(runs: list[dict]) -> dict:
    """Means over seeds; time to target over the seeds that reached it (`reached` counts them)."""
    reached = [r for r in runs if r["time_to_target_s"] is not None]
    jumps = [f["eval_after"] - f["eval_before"] for r in runs for f in r["failures"]]
    return {
        "failures": statistics.fmean(len(r["failures"]) for r in runs),
        "reached": len(reached),
        "time_to_target_s": statistics.fmean(r["time_to_target_s"] for r in reached)
        if reached
        else None,
        "steps_to_target": statistics.fmean(r["steps_to_target"] for r in reached)
        if reached
        else None,
        "eval_jump_per_failure": statistics.fmean(jumps) if jumps else None,
        **{
            key: statistics.fmean(r[key] for r in runs)
            for key in ("final_eval_loss", "recovery_seconds", "recomputed_steps", "wall_seconds")
        },
    }


def plot(document: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, seed = document["results"], str(document["seeds"][0])
    wheres, rates = list(results), document["rates"]
    fig, axes = plt.subplots(
        len(wheres), len(rates), figsize=(6 * len(rates), 4.3 * len(wheres)), squeeze=False
    )
    for row, where in enumerate(wheres):
        for col, rate in enumerate(rates):
            ax = axes[row][col]
            for method, entry in results[where][str(rate)].items():
                curve = (document["no_failure"] if method == "no-failure" else entry["runs"])[seed][
                    "curve"
                ]
                ax.plot(
                    [p["seconds"] for p in curve],
                    [p["eval_loss"] for p in curve],
                    marker=".",
                    ms=3,
                    color=COLORS[method],
                    label=method,
                )
            ax.axhline(document["target_loss"][seed], color="grey", ls="--", lw=0.8)
            ax.set_ylim(top=document["no_failure"][seed]["curve"][1]["eval_loss"])
            ax.set_xlabel("wall-clock seconds (steps + recovery)")
            ax.set_ylabel("held-out loss (nats)")
            ax.set_title(f"{where} stage failures, {rate}/100 steps (seed {seed})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-deep", choices=sorted(PRESETS))
    parser.add_argument(
        "--n-layers",
        type=int,
        help="blocks (default: the preset's, raised to S−1 if fewer: tiny-deep 4 → 5)",
    )
    parser.add_argument(
        "--stages", type=int, default=6, help="S: stage 0 + S−1 block stages (>= 5)"
    )
    parser.add_argument("--steps", type=int, default=400, help="steps of progress per run")
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[1.0, 3.0],
        help="expected failures per 100 computed steps",
    )
    parser.add_argument(
        "--where", nargs="+", default=["intermediate", "edge"], choices=list(METHODS)
    )
    parser.add_argument(
        "--methods", nargs="+", help="a subset of the methods (default: all that apply)"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="failure-schedule and data seeds"
    )
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument(
        "--swap-fraction", type=float, default=0.5, help="CheckFree+: share of out-of-order steps"
    )
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument(
        "--target-fraction",
        type=float,
        default=0.8,
        help="target = no-failure eval loss at this share of its steps",
    )
    parser.add_argument("--target-loss", type=float, help="an absolute target instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench_checkfree.json")
    args = parser.parse_args()
    if args.stages < 5:
        parser.error(
            "--stages must be >= 5 (CheckFree+ swaps 1↔2 and S−2↔S−1, which must be distinct pairs)"
        )
    if not 0 < args.swap_fraction <= 1:
        parser.error("--swap-fraction must be in (0, 1]")
    torch.set_num_threads(args.threads)

    preset = PRESETS[args.model]
    config = dataclasses.replace(
        preset, n_layers=args.n_layers or max(preset.n_layers, args.stages - 1)
    )
    recipe = RECIPES[args.model]
    inner = InnerConfig(
        lr=recipe.inner_lr,
        warmup_steps=recipe.warmup_steps,
        batch_size=recipe.batch_size,
        seq_len=recipe.seq_len,
    )
    plan = StagePlan(args.stages, config.n_layers)
    print(
        f"model {args.model} {config.to_dict()}, {args.stages} stages, blocks per stage "
        f"{[len(plan.blocks(s)) for s in range(1, args.stages)]}, inner {inner.to_dict()}",
        flush=True,
    )
    data = ByteData(load_corpus(None))
    eval_set = data.eval_batches(inner.batch_size, inner.seq_len, args.eval_batches)
    eligible = {"intermediate": list(range(2, args.stages - 1)), "edge": [1, args.stages - 1]}
    horizon = (
        10 * args.steps
    )  # failures are drawn this far; checkpoint runs compute more than --steps
    begin = time.perf_counter()

    no_failure, target, results = {}, {}, {w: {str(r): {} for r in args.rates} for w in args.where}
    for seed in args.seeds:
        stream = data.train_batches("peer-0", inner.batch_size, inner.seq_len, seed=seed)
        setup = Setup(
            args,
            seed,
            config,
            plan,
            inner,
            [build_stage(config, plan, s, seed) for s in range(args.stages)],
            [next(stream) for _ in range(2 * args.steps)],
            eval_set,
        )
        if (
            seed == args.seeds[0]
        ):  # first steps are slower (allocator, kernels): keep them out of every clock
            warm_up = Pipeline(setup)
            for batch in setup.batches[:20]:
                warm_up.step(batch, path_of("no-failure", 0, setup))
        print(f"== seed {seed}: no-failure", flush=True)
        no_failure[str(seed)] = run("no-failure", setup, {})
        at = round(args.target_fraction * args.steps)
        target[str(seed)] = (
            args.target_loss
            if args.target_loss is not None
            else min(no_failure[str(seed)]["curve"], key=lambda p: abs(p["step"] - at))["eval_loss"]
        )
        for where in args.where:
            for rate in args.rates:
                failures = failure_schedule(rate, seed, eligible[where], horizon)
                for method in METHODS[where]:
                    if args.methods and method not in args.methods:
                        continue
                    row = run(method, setup, failures, target[str(seed)])
                    reach(row, target[str(seed)])
                    results[where][str(rate)].setdefault(method, {"runs": {}})["runs"][
                        str(seed)
                    ] = row
                    print(
                        f"   {where} rate {rate:g} {method:<10} failures "
                        f"{len(row['failures'])}  wall {row['wall_seconds']:.1f} s  "
                        f"final {row['final_eval_loss']:.3f}",
                        flush=True,
                    )

    for seed, row in no_failure.items():
        reach(row, target[seed])
    for by_rate in results.values():
        for rate, by_method in by_rate.items():
            for entry in by_method.values():
                entry.update(summarize(list(entry["runs"].values())))
            by_rate[rate] = {
                "no-failure": {"runs": "see no_failure", **summarize(list(no_failure.values()))},
                **by_method,
            }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": "python scripts/bench_checkfree.py " + " ".join(sys.argv[1:]),
        "model": config.to_dict(),
        "stages": args.stages,
        "inner": inner.to_dict(),
        "steps": args.steps,
        "rates": args.rates,
        "seeds": args.seeds,
        "checkpoint_every": args.checkpoint_every,
        "swap_fraction": args.swap_fraction,
        "eval_every": args.eval_every,
        "target_loss": target,
        "no_failure": no_failure,
        "results": results,
        "script_seconds": time.perf_counter() - begin,
    }
    try:
        document["plot"] = plot(document, out)
    except ImportError:
        document["plot"] = "matplotlib not installed (pip install -e '.[plot]')"
    out.write_text(json.dumps(document, indent=1))

    print(
        f"\ntarget eval loss per seed: "
        f"{', '.join(f'{s}: {t:.3f}' for s, t in target.items())}; "
        f"means over {len(args.seeds)} seeds"
    )
    print(
        f"{'where':<12} {'rate':>4} {'method':<10} {'fails':>5} {'reached':>7} "
        f"{'to target s':>11} {'steps':>5} {'final':>6} "
        f"{'jump':>6} {'recov s':>7} {'recomp':>6} {'wall s':>6}"
    )
    for where, by_rate in results.items():
        for rate, by_method in by_rate.items():
            for method, e in by_method.items():
                to_target = "—" if e["time_to_target_s"] is None else f"{e['time_to_target_s']:.1f}"
                steps = "—" if e["steps_to_target"] is None else f"{e['steps_to_target']:.0f}"
                jump = (
                    ""
                    if e["eval_jump_per_failure"] is None
                    else f"{e['eval_jump_per_failure']:+.3f}"
                )
                print(
                    f"{where:<12} {float(rate):4g} {method:<10} {e['failures']:5.1f} "
                    f"{e['reached']:>4}/{len(args.seeds):<2} "
                    f"{to_target:>11} {steps:>5} {e['final_eval_loss']:6.3f} {jump:>6} "
                    f"{e['recovery_seconds']:7.2f} "
                    f"{e['recomputed_steps']:6.0f} {e['wall_seconds']:6.1f}"
                )
    print(f"written to {out} and {document['plot']} ({document['script_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
