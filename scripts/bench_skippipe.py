"""SkipPipe against the full pipeline on an uneven swarm: iteration time, eval loss at
equal tokens, and held-out loss through only part of the model. Every peer is a
`shoal peer` process.

    # on loopback; then with uneven links (--wan, as root)
    python scripts/bench_skippipe.py --out results/bench_skippipe.json
    sudo python scripts/bench_skippipe.py --wan --out results/bench_skippipe_wan.json

The README's rows: iteration time with the emulated devices 2.5x slower (so that they,
not this machine's two shared cores, set the pace) and 16 microbatches per step,
`--speed-scale 2.5 --activation int8 --rounds 3 --inner-steps 20 --microbatch-size 1
--in-flight 16`; eval loss at equal tokens over a longer run, `--activation int8
--rounds 20 --inner-steps 20`.

The swarm: one pipeline replica of 6 stages (model `small-deep`, 10 blocks: stage 0 =
embedding/head/loss, stages 1-5 = two blocks each), each block stage served by two peers of
different speed, emulated with `--emulate-forward-ms` (a training forward on that peer
takes at least that long, a backward twice that; the real compute of this small model is a
few ms). Speeds in ms per forward of one microbatch, per stage:

    stage 1: 20, 60   stage 2: 20, 20   stage 3: 60, 80   stage 4: 20, 40   stage 5: 30, 90

With `--wan` (root) every peer runs in its own network namespace and the links alternate
between `--fast-rate` and `--slow-rate` (stage 0 fast), so some paths are slow links too.

Two runs with the same seeds, data and token budget (DiLoCo int8 outer rounds between the
two replicas of each stage, SWARM routing among them):

* `full`: every microbatch visits stages 1..5 in order;
* `skippipe`: `--skip-ratio 0.33` with the runtime's defaults: each microbatch visits 3 of
  the 5 block stages (4 of 6 counting stage 0), stage 1 always first among them
  (`--skip-keep 1`), in order (`--skip-swaps 0`), the skipped-over stages' residual
  updates scaled by p^-1/2 in training forwards (`--skip-rescale sqrt`), on paths and
  peers the SkipPipe scheduler (pipeline/skippipe.py) plans each step from the live peers
  and their measured hop times;
* ablations (`--runs`): `skippipe-unscaled` (`--skip-rescale none`), `skippipe-swaps`
  (`--skip-swaps 2`: up to two pairs of adjacent stages swapped, the paper's limit),
  `skippipe-keep-none` (`--skip-keep none`: any block stage may be skipped, stage 1
  included) and `skippipe-keep-none-swaps` (both).

Reported per run: iteration time (one inner step of the pipeline replica; the median over
rounds 2.. so the routers have measured the peers), held-out loss per round through the
whole model and through stages 1, 3, 5 only (`--eval-stages`, 6 of 10 blocks), and the
ratios skippipe / full. Writes JSON and a PNG of eval loss against tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "wan"))
from swarm import run_swarm  # noqa: E402

MODEL = "small-deep"
STAGES = 6
SPEEDS_MS = {1: (20, 60), 2: (20, 20), 3: (60, 80), 4: (20, 40), 5: (30, 90)}
EVAL_STAGES = "1,3,5"
RUNS = {
    "full": [],
    "skippipe": ["--skip-ratio", "0.33"],
    "skippipe-unscaled": ["--skip-ratio", "0.33", "--skip-rescale", "none"],
    "skippipe-swaps": ["--skip-ratio", "0.33", "--skip-swaps", "2"],
    "skippipe-keep-none": ["--skip-ratio", "0.33", "--skip-keep", "none"],
    "skippipe-keep-none-swaps": [
        "--skip-ratio",
        "0.33",
        "--skip-keep",
        "none",
        "--skip-swaps",
        "2",
    ],
}


def peer_flags(run_flags: list[str], speed_scale: float) -> list[list[str]]:
    """Peer 0 drives (stage 0); then two peers per block stage, at their emulated speeds."""
    stage = ["--role", "stage"]
    flags = [[*stage, "--stage", "0", "--eval-stages", EVAL_STAGES, *run_flags]]
    for k, speeds in SPEEDS_MS.items():
        flags += [
            [*stage, "--stage", str(k), "--emulate-forward-ms", f"{ms * speed_scale:g}"]
            for ms in speeds
        ]
    return flags


def link_rates(peers: int, fast: str, slow: str) -> list[str]:
    return [fast if i % 2 == 0 else slow for i in range(peers)]


def summarize(reports: list[dict], tokens_per_step: int, inner_steps: int) -> dict:
    driver = next(r for r in reports if r["role"] == "stage" and r["stage"] == 0)
    rounds = driver["rounds"]
    per_round = [e["inner_seconds"] / inner_steps for e in rounds]
    curve = [
        {
            "round": e["round"],
            "tokens": e["round"] * inner_steps * tokens_per_step,
            "eval_loss": e["eval_loss"],
            "eval_loss_partial": e.get("eval_loss_partial"),
        }
        for e in rounds
    ]
    final = rounds[-1]
    return {
        "iteration_s_per_round": per_round,
        "iteration_s": statistics.median(per_round[1:] or per_round),
        "curve": curve,
        "final_eval_loss": final["eval_loss"],
        "final_eval_loss_partial": final.get("eval_loss_partial"),
        "final_perplexity": math.exp(final["eval_loss"]),
        "final_perplexity_partial": math.exp(final["eval_loss_partial"])
        if final.get("eval_loss_partial")
        else None,
        "pipeline": driver.get("pipeline"),
        "tokens": driver["inner_steps_total"] * tokens_per_step,
    }


def run_key(name: str, repeat: int) -> str:
    """The results row of run `name` in repeat `repeat` (0-based): name, name#2, name#3, ..."""
    return name if repeat == 0 else f"{name}#{repeat + 1}"


def setting_of(key: str) -> str:
    """The run name a results row belongs to: `run_key`'s inverse, without the repeat."""
    return key.split("#", 1)[0]


def vs_full(results: dict, runs: list[str], repeats: int) -> dict:
    """Each run against the full pipeline of the same repeat: ratios per repeat and their mean
    (`iteration_time_ratio` and `eval_loss_ratio` at the top level: skippipe's means)."""
    table = {}
    for name in (n for n in runs if n != "full"):
        pairs = [(results[run_key("full", r)], results[run_key(name, r)]) for r in range(repeats)]
        iteration = [run["iteration_s"] / full["iteration_s"] for full, run in pairs]
        loss = [run["final_eval_loss"] / full["final_eval_loss"] for full, run in pairs]
        table[name] = {
            "iteration_time_ratio": iteration,
            "eval_loss_ratio": loss,
            "iteration_time_ratio_mean": statistics.fmean(iteration),
            "eval_loss_ratio_mean": statistics.fmean(loss),
        }
    summary: dict = {
        "vs_full": table,
        "partial_perplexity_increase": {
            n: r["final_perplexity_partial"] / r["final_perplexity"] - 1 for n, r in results.items()
        },
    }
    if "skippipe" in table:
        summary["iteration_time_ratio"] = table["skippipe"]["iteration_time_ratio_mean"]
        summary["eval_loss_ratio"] = table["skippipe"]["eval_loss_ratio_mean"]
    return summary


def plot(results: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    settings = list(dict.fromkeys(setting_of(name) for name in results))
    colors = {
        key: f"C{i}" for i, key in enumerate(settings)
    }  # a setting's repeats share its colour
    for name, row in results.items():
        tokens = [p["tokens"] / 1e6 for p in row["curve"]]
        color = colors[setting_of(name)]
        left.plot(
            tokens,
            [p["eval_loss"] for p in row["curve"]],
            marker=".",
            color=color,
            label=f"{name}: all stages",
        )
        left.plot(
            tokens,
            [p["eval_loss_partial"] for p in row["curve"]],
            "--",
            marker=".",
            color=color,
            label=f"{name}: stages {EVAL_STAGES} only",
        )
    left.set(
        title=f"6-stage pipeline ({MODEL}), uneven peers",
        xlabel="tokens (M)",
        ylabel="held-out loss (nats/byte)",
    )
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    names = list(results)
    right.bar(
        names,
        [results[n]["iteration_s"] for n in names],
        color=[colors[setting_of(n)] for n in names],
    )
    right.tick_params(axis="x", labelrotation=25)
    right.set(title="iteration time (median over rounds 2..)", ylabel="seconds per inner step")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--inner-steps", type=int, default=20)
    parser.add_argument("--microbatch-size", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument(
        "--speed-scale",
        type=float,
        default=1.0,
        help="multiply every emulated forward time "
        "(larger: the emulated devices dominate this machine's own CPU time)",
    )
    parser.add_argument(
        "--activation",
        default="none",
        help="the pipeline replica's activation codec (none, int8, subspace:R)",
    )
    parser.add_argument(
        "--wan",
        action="store_true",
        help="run each peer in its own namespace with uneven links (root)",
    )
    parser.add_argument("--fast-rate", default="200mbit")
    parser.add_argument("--slow-rate", default="20mbit")
    parser.add_argument("--runs", nargs="+", default=["full", "skippipe"], choices=list(RUNS))
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run the list this many times (rows name#2, name#3, ...): the runs' routing is "
        "timing-dependent, so one pair of runs differs by a few percent by chance",
    )
    parser.add_argument("--out", default="results/bench_skippipe.json")
    parser.add_argument("--keep-logs", help="keep the peers' logs and reports under this folder")
    parser.add_argument(
        "--replot", metavar="JSON", help="only redraw the PNG of an earlier run's JSON"
    )
    args = parser.parse_args()
    if args.replot:
        print(plot(json.loads(Path(args.replot).read_text())["results"], Path(args.replot)))
        return 0

    from shoal.train import RECIPES

    recipe = RECIPES[MODEL]
    tokens_per_step = recipe.batch_size * recipe.seq_len
    common = [
        "--model",
        MODEL,
        "--stages",
        str(STAGES),
        "--outer",
        "diloco",
        "--codec",
        "int8",
        "--inner-steps",
        str(args.inner_steps),
        "--threads",
        "1",
        "--seed",
        "0",
        "--microbatch-size",
        str(args.microbatch_size),
        "--in-flight",
        str(args.in_flight),
        "--gather-timeout",
        "600",
        "--activation",
        args.activation,
    ]
    logs = Path(args.keep_logs or tempfile.mkdtemp(prefix="shoal-skippipe-"))
    results: dict = {}
    for repeat in range(args.repeats):
        for name in args.runs:
            key = run_key(name, repeat)
            flags = peer_flags(RUNS[name], args.speed_scale)
            rates = link_rates(len(flags), args.fast_rate, args.slow_rate) if args.wan else None
            print(
                f"== {key}: {len(flags)} peers, {args.rounds} rounds of {args.inner_steps} steps",
                flush=True,
            )
            begin = time.monotonic()
            row = summarize(
                run_swarm(len(flags), rates, args.rounds, logs / key, common, peer_flags=flags),
                tokens_per_step,
                args.inner_steps,
            )
            row["launcher_seconds"] = time.monotonic() - begin
            results[key] = row
            print(
                f"   iteration {row['iteration_s']:.3f} s, eval {row['final_eval_loss']:.3f}, "
                f"stages {EVAL_STAGES} only {row['final_eval_loss_partial']:.3f}",
                flush=True,
            )

    summary = vs_full(results, args.runs, args.repeats) if "full" in args.runs else {}
    for name, row in summary.get("vs_full", {}).items():
        print(
            f"{name} / full: iteration time {row['iteration_time_ratio_mean']:.3f}, "
            f"final eval loss {row['eval_loss_ratio_mean']:.4f} "
            f"(per repeat {', '.join(f'{v:.4f}' for v in row['eval_loss_ratio'])})"
        )
    if summary:
        print(
            f"perplexity through stages {EVAL_STAGES} vs all: "
            + ", ".join(
                f"{n} +{100 * v:.1f}%" for n, v in summary["partial_perplexity_increase"].items()
            )
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": "python scripts/bench_skippipe.py " + " ".join(sys.argv[1:]),
        "model": MODEL,
        "stages": STAGES,
        "speeds_ms": {k: [ms * args.speed_scale for ms in v] for k, v in SPEEDS_MS.items()},
        "activation": args.activation,
        "wan": [args.fast_rate, args.slow_rate] if args.wan else None,
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "repeats": args.repeats,
        "tokens_per_step": tokens_per_step,
        "summary": summary,
        "results": results,
    }
    document["plot"] = plot(results, out)
    out.write_text(json.dumps(document, indent=1))
    print(f"wrote {out} and {document['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
