r"""Every outer algorithm on the same model, data, seeds and token budget, 4 peer processes,
over emulated slow links: eval loss against tokens, bytes sent and wall-clock time, plus
compute utilization and the longest stall.

    sudo python scripts/bench_convergence.py --rates 100mbit 10mbit \
        --out results/bench_convergence.json

Methods (each peer takes --steps inner steps in all; H = --inner-steps):

* `ddp`: DDP-equivalent traffic: dense fp32 averaging after every inner step (DiLoCo with
  H = 1, outer lr 1, no momentum: θ ← mean of the replicas' θ). On a slow link it takes
  long, so it runs only --ddp-steps steps there (its utilization is measured over those);
* `diloco-fp32`, `diloco-int8`, `sparseloco`, `noloco`: one outer round per H steps (the
  dense codecs average by reduce-scatter, the mean re-quantized with the codec);
  `diloco-int8-gather`: int8 DiLoCo averaged by the gather (the exact mean of the int8
  contributions), to measure what re-quantizing the mean costs;
* `streaming`: Streaming DiLoCo, P = 4 fragments, one sync every H/P steps, τ = --overlap.

Every method evaluates after each H inner steps (streaming: every P-th round, DDP: every
H-th), on the same held-out split, so the curves share their x positions in tokens. Rates
are per peer link, both directions, through `scripts/wan/netns.py` (root); `loopback` runs
on 127.0.0.1 without shaping. Per method and rate the JSON has the curves and:
* `utilization`: time in inner steps / time from the first inner step to the end, mean
  over peers; `utilization_excl_eval`: the same with the time spent evaluating (the
  benchmark's own measurement, ~0.5 s of one core per evaluation) taken out of the span;
* `longest_stall_s`: the longest stretch any peer spent between two inner phases
  (waiting for others, encoding, outer step, evaluation);
* `bytes_sent_per_peer`, `peak_round_bytes_per_peer` (the largest upload of one round).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "wan"))
from swarm import run_swarm  # noqa: E402

FRAGMENTS = 4


def methods(h: int, overlap: int) -> dict[str, tuple[list[str], int, int]]:
    """name → (flags, inner steps per round, eval every N rounds)."""
    return {
        "ddp": (
            ["--outer", "diloco", "--codec", "fp32", "--outer-lr", "1.0", "--outer-momentum", "0"],
            1,
            h,
        ),
        "diloco-fp32": (["--outer", "diloco", "--codec", "fp32"], h, 1),
        "diloco-int8": (["--outer", "diloco", "--codec", "int8"], h, 1),  # reduce-scatter
        # the gather: the exact mean of the int8 contributions (no re-quantized mean)
        "diloco-int8-gather": (
            ["--outer", "diloco", "--codec", "int8", "--exchange", "gather"],
            h,
            1,
        ),
        "sparseloco": (["--outer", "sparseloco"], h, 1),
        "noloco": (["--outer", "noloco"], h, 1),
        "streaming": (
            ["--outer", "streaming", "--fragments", str(FRAGMENTS), "--overlap", str(overlap)],
            h // FRAGMENTS,
            FRAGMENTS,
        ),
    }


def summarize(reports: list[dict], tokens_per_step: int, steps_per_round: int) -> dict:
    """Curves and utilization numbers from the peers' reports."""
    start = min(r["train_started_at"] for r in reports)
    peers = len(reports)
    curve = []
    for i, entry in enumerate(reports[0]["rounds"]):
        losses = [
            r["rounds"][i]["eval_loss"]
            for r in reports
            if i < len(r["rounds"]) and r["rounds"][i]["eval_loss"] is not None
        ]
        if not losses:
            continue
        curve.append(
            {
                "round": entry["round"],
                "tokens": entry["round"] * steps_per_round * tokens_per_step * peers,
                "eval_loss": statistics.fmean(losses),  # NoLoCo replicas differ: their mean
                "bytes_sent_per_peer": statistics.fmean(
                    r["rounds"][i]["bytes_sent"] for r in reports if i < len(r["rounds"])
                ),
                "seconds": max(r["rounds"][i]["time"] for r in reports if i < len(r["rounds"]))
                - start,
            }
        )
    spans = [r["rounds"][-1]["time"] - r["train_started_at"] for r in reports]
    utilization = [
        r["inner_seconds_total"] / max(1e-9, span) for r, span in zip(reports, spans, strict=True)
    ]
    # evaluation is the benchmark's measurement, not training: utilization without it
    training = [
        r["inner_seconds_total"] / max(1e-9, span - r["eval_seconds_total"])
        for r, span in zip(reports, spans, strict=True)
    ]
    uploads = [
        b["contribution_bytes_sent"] - a["contribution_bytes_sent"]
        for r in reports
        for a, b in zip([{"contribution_bytes_sent": 0}, *r["rounds"]], r["rounds"], strict=False)
    ]
    return {
        "initial_eval_loss": statistics.fmean(r["initial_eval_loss"] for r in reports),
        "final_eval_loss": curve[-1]["eval_loss"] if curve else None,
        "rounds": len(reports[0]["rounds"]),
        "tokens": curve[-1]["tokens"] if curve else 0,
        "wall_seconds": max(r["rounds"][-1]["time"] for r in reports) - start,
        "bytes_sent_per_peer": statistics.fmean(r["bytes_sent"] for r in reports),
        "peak_round_bytes_per_peer": max(uploads) if uploads else 0,
        "utilization": statistics.fmean(utilization),
        "utilization_per_peer": utilization,
        "utilization_excl_eval": statistics.fmean(training),
        "eval_seconds_per_peer": statistics.fmean(r["eval_seconds_total"] for r in reports),
        "longest_stall_s": max(r["longest_stall_s"] for r in reports),
        "curve": curve,
    }


def plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rates = list(results)
    for axis, label, key in (
        ("tokens", "training tokens (all peers)", "tokens"),
        ("bytes", "MB sent per peer", "bytes_sent_per_peer"),
        ("wall", "wall-clock seconds", "seconds"),
    ):
        fig, axes = plt.subplots(1, len(rates), figsize=(6.5 * len(rates), 4.5), squeeze=False)
        for ax, rate in zip(axes[0], rates, strict=True):
            for method, row in results[rate].items():
                xs = [p[key] / (1e6 if key == "bytes_sent_per_peer" else 1) for p in row["curve"]]
                ax.plot(xs, [p["eval_loss"] for p in row["curve"]], marker=".", label=method)
            ax.set_xlabel(label)
            ax.set_ylabel("held-out loss (nats)")
            ax.set_title(f"link {rate}")
            if key == "bytes_sent_per_peer":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out.with_name(f"{out.stem}_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument(
        "--rates",
        nargs="+",
        default=["100mbit", "10mbit"],
        help="per-peer link rates; 'loopback' for none",
    )
    parser.add_argument(
        "--steps", type=int, default=240, help="inner steps per peer (the token budget)"
    )
    parser.add_argument("--inner-steps", type=int, default=24, help="H for the outer methods")
    parser.add_argument("--overlap", type=int, default=5, help="Streaming DiLoCo's τ")
    parser.add_argument(
        "--ddp-steps",
        type=int,
        default=24,
        help="steps of `ddp` on shaped links (it is slow there)",
    )
    parser.add_argument("--methods", nargs="+", help="a subset of the methods")
    parser.add_argument(
        "--final-eval-only",
        action="store_true",
        help="evaluate only after the last round "
        "(utilization without the benchmark's own evaluations)",
    )
    parser.add_argument("--model", default="small")
    parser.add_argument("--out", default="results/bench_convergence.json")
    parser.add_argument("--keep-logs", help="keep the peers' logs and reports under this folder")
    args = parser.parse_args()

    from shoal.train import RECIPES

    recipe = RECIPES[args.model]
    tokens_per_step = recipe.batch_size * recipe.seq_len
    table = methods(args.inner_steps, args.overlap)
    chosen = args.methods or list(table)
    results: dict[str, dict[str, dict]] = {}
    logs_root = Path(args.keep_logs or tempfile.mkdtemp(prefix="shoal-conv-"))
    for rate in args.rates:
        results[rate] = {}
        for name in chosen:
            flags, steps_per_round, eval_every = table[name]
            steps = args.ddp_steps if name == "ddp" and rate != "loopback" else args.steps
            rounds = steps // steps_per_round
            if args.final_eval_only:
                eval_every = rounds
            cmd_flags = [
                *flags,
                "--model",
                args.model,
                "--inner-steps",
                str(args.inner_steps if name != "ddp" else 1),
                "--eval-every",
                str(eval_every),
                "--threads",
                "1",
                "--seed",
                "0",
            ]
            print(f"== {rate} {name}: {rounds} rounds of {steps_per_round} steps", flush=True)
            begin = time.monotonic()
            reports = run_swarm(
                args.peers,
                None if rate == "loopback" else [rate],
                rounds,
                logs_root / rate / name,
                cmd_flags,
            )
            row = summarize(reports, tokens_per_step, steps_per_round)
            row.update(
                flags=cmd_flags, steps_per_peer=steps, launcher_seconds=time.monotonic() - begin
            )
            results[rate][name] = row
            print(
                f"   final eval {row['final_eval_loss']:.3f}, "
                f"{row['bytes_sent_per_peer'] / 1e6:.1f} MB/peer, "
                f"utilization {row['utilization']:.1%} "
                f"({row['utilization_excl_eval']:.1%} excl. eval), "
                f"longest stall {row['longest_stall_s']:.1f} s, "
                f"wall {row['wall_seconds']:.0f} s",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": "python scripts/bench_convergence.py " + " ".join(sys.argv[1:]),
        "peers": args.peers,
        "model": args.model,
        "steps_per_peer": args.steps,
        "inner_steps": args.inner_steps,
        "tokens_per_step": tokens_per_step,
        "results": results,
    }
    try:
        document["plots"] = plot(results, out)
    except ImportError:
        document["plots"] = "matplotlib not installed (pip install -e '.[plot]')"
    out.write_text(json.dumps(document, indent=1))
    print(
        f"{'rate':<9} {'method':<12} {'final eval':>10} {'MB/peer':>9} {'peak MB/round':>13} "
        f"{'util':>6} {'w/o eval':>8} {'stall s':>8} {'wall s':>7}"
    )
    for rate, rows in results.items():
        for name, row in rows.items():
            print(
                f"{rate:<9} {name:<12} {row['final_eval_loss']:10.3f} "
                f"{row['bytes_sent_per_peer'] / 1e6:9.2f} "
                f"{row['peak_round_bytes_per_peer'] / 1e6:13.3f} {row['utilization']:6.1%} "
                f"{row['utilization_excl_eval']:8.1%} {row['longest_stall_s']:8.1f} "
                f"{row['wall_seconds']:7.0f}"
            )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
