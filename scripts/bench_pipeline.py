"""Pipeline replicas: activation bytes per token, throughput of a 4-stage pipeline on
loopback and over emulated slow links, and eval loss at equal tokens for each activation
codec and for heterogeneous compression. Every peer is a `shoal peer` process.

    python scripts/bench_pipeline.py --out results/bench_pipeline.json            # loopback
    sudo python scripts/bench_pipeline.py --rates 20mbit --out results/bench_pipeline.json

Runs (model `small`, 4 stages: stage 0 = embedding/head/loss, stages 1-3 = blocks 0-1, 2, 3;
DiLoCo int8 outer rounds, the same seeds, data shards and token budget per replica):

* `codec/<setting>`: one pipeline replica (4 stage peers) alone, for each activation
  setting (`--codecs`; default none, int8, subspace:8, subspace:32, subspace-int8:32,
  subspace-int4:32, subspace:100, subspace-int4:100), each once per `--seeds`. Eval loss
  per round (stage 0 evaluates through the chain, held-out split), tokens/s, and the hop
  bytes measured on
  the wire, per token and per activation payload (a microbatch crosses the network
  4·(S−1) times in this star layout: stage 0 sends every stage its input and gets its
  output back, forward and backward; the token ids ride along in every request).
* `mixed/<name>`: the heterogeneous setting, 2 full replicas + 1 pipeline replica:
  `full-only` (the 2 full replicas alone), `pipeline-none` (uncompressed pipeline),
  `hetero` (full replicas uncompressed, pipeline at `--mixed-activation`, default
  subspace-int4:32) and `all-compressed` (every replica compressed: the full replicas
  train confined to the same subspace, as compressed pipeline replicas would).
* `wan/<rate>/<setting>`: throughput of the 4-stage pipeline with each stage peer's link
  shaped to <rate> through network namespaces (root; `--rates`), a few rounds each.

Eval loss "at equal tokens" compares rounds: every replica takes the same inner steps of
the same batch size per round. Writes JSON and a PNG of eval loss against tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "wan"))
from swarm import run_swarm  # noqa: E402

STAGES = 4
CODECS = [
    "none",
    "int8",
    "subspace:8",
    "subspace:32",
    "subspace-int8:32",
    "subspace-int4:32",
    "subspace:100",
    "subspace-int4:100",
]
HOP_KINDS = ("forward", "backward")


def stage_flags(activation: str) -> list[list[str]]:
    return [
        ["--role", "stage", "--stage", str(k), "--activation", activation] for k in range(STAGES)
    ]


def mixed_runs(compressed: str) -> dict[str, list[list[str]]]:
    full = [["--role", "replica"], ["--role", "replica"]]
    confined = [["--role", "replica", "--activation", compressed]] * 2
    return {
        "full-only": full,
        "pipeline-none": full + stage_flags("none"),
        "hetero": full + stage_flags(compressed),
        "all-compressed": confined + stage_flags(compressed),
    }


def summarize(reports: list[dict], tokens_per_step: int, inner_steps: int) -> dict:
    by_role: dict[str, list[dict]] = {}
    for report in reports:
        key = "full" if report["role"] == "replica" else f"stage-{report['stage']}"
        by_role.setdefault(key, []).append(report)
    row: dict = {
        "wall_seconds": max(r["finished_at"] for r in reports)
        - min(r["train_started_at"] for r in reports)
    }

    def curve(report: dict) -> list[dict]:
        return [
            {
                "round": e["round"],
                "tokens": e["round"] * inner_steps * tokens_per_step,
                "eval_loss": e["eval_loss"],
                "time": e["time"] - report["train_started_at"],
            }
            for e in report["rounds"]
        ]

    if "full" in by_role:
        row["full_curve"] = curve(by_role["full"][0])
        row["full_final_eval_loss"] = by_role["full"][0]["rounds"][-1]["eval_loss"]
    if "stage-0" in by_role:
        driver = by_role["stage-0"][0]
        stages = [r for r in reports if r["role"] == "stage"]
        hop_bytes = sum(r["bytes_sent_by_kind"].get(kind, 0) for r in stages for kind in HOP_KINDS)
        tokens = driver["inner_steps_total"] * tokens_per_step
        row.update(
            pipeline_curve=curve(driver),
            pipeline_final_eval_loss=driver["rounds"][-1]["eval_loss"],
            pipeline_tokens_per_s=tokens / driver["inner_seconds_total"],
            hop_bytes=hop_bytes,
            hop_bytes_per_token=hop_bytes / tokens,
            hop_bytes_per_token_per_payload=hop_bytes / tokens / (4 * (STAGES - 1)),
            pipeline=driver.get("pipeline"),
        )
    return row


def codec_table(config, specs: list[str]) -> dict[str, dict]:
    """Bytes per token of one activation payload, from the codecs themselves."""
    from shoal.pipeline.compression import parse_activation

    d_model = config.d_model
    rows = {}
    for spec in specs:
        codec = parse_activation(spec, config, 0).codec
        per_token = codec.bytes_per_token(d_model)
        rows[spec] = {
            "bytes_per_token": per_token,
            "ratio_vs_fp32": 4 * d_model / per_token,
            "k": getattr(getattr(codec, "basis", None), "k", None),
        }
    return rows


def plot(results: dict, out: Path, model: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [part for part in ("codec", "mixed") if results.get(part)]
    if not panels:
        return "nothing to plot"
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    axes = axes[0]
    for axis, part in zip(axes, panels, strict=True):
        for name, row in results[part].items():
            for which, style in (
                ("full_curve", "-"),
                ("pipeline_curve", "--" if part == "mixed" else "-"),
            ):
                if which in row:
                    points = row[which]
                    label = (
                        name
                        if part == "codec"
                        else f"{name}: {'full replica' if which == 'full_curve' else 'pipeline'}"
                    )
                    axis.plot(
                        [p["tokens"] / 1e6 for p in points],
                        [p["eval_loss"] for p in points],
                        style,
                        marker=".",
                        label=label,
                    )
        title = (
            "one 4-stage pipeline replica, by activation codec"
            if part == "codec"
            else "2 full replicas + 1 pipeline replica"
        )
        axis.set(
            title=f"{title} ({model})",
            xlabel="tokens per replica (M)",
            ylabel="held-out loss (nats/byte)",
        )
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=25)
    parser.add_argument(
        "--rates",
        nargs="*",
        default=[],
        help="per-peer link rates for the throughput runs (root), e.g. 20mbit",
    )
    parser.add_argument("--wan-rounds", type=int, default=2)
    parser.add_argument(
        "--parts", nargs="+", default=["codec", "mixed", "wan"], choices=["codec", "mixed", "wan"]
    )
    parser.add_argument("--codecs", nargs="+", default=CODECS)
    parser.add_argument(
        "--mixed-activation",
        default="subspace-int4:32",
        help="mixed part: the compressed replicas' activation setting",
    )
    parser.add_argument("--microbatch-size", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--model", default="small", help="model preset (4 stages need >= 3 blocks)")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="codec part: run every setting once per run seed (init and data order) and "
        "report each seed's ratio to none and their mean; the other parts use the first",
    )
    parser.add_argument("--out", default="results/bench_pipeline.json")
    parser.add_argument("--keep-logs", help="keep the peers' logs and reports under this folder")
    parser.add_argument(
        "--replot", metavar="JSON", help="only redraw the PNG of an earlier run's JSON"
    )
    args = parser.parse_args()
    if args.replot:
        document = json.loads(Path(args.replot).read_text())
        print(plot(document["results"], Path(args.replot), document.get("model", "small")))
        return 0

    from shoal.train import PRESETS, RECIPES

    recipe, config = RECIPES[args.model], PRESETS[args.model]
    tokens_per_step = recipe.batch_size * recipe.seq_len

    def common(seed: int) -> list[str]:
        return [
            "--model",
            args.model,
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
            str(seed),
            "--microbatch-size",
            str(args.microbatch_size),
            "--in-flight",
            str(args.in_flight),
            "--gather-timeout",
            "600",
        ]

    logs = Path(args.keep_logs or tempfile.mkdtemp(prefix="shoal-pipe-"))
    results: dict = {
        "codec_bytes": codec_table(config, list(dict.fromkeys([*CODECS, *args.codecs])))
    }

    def run(
        part: str,
        name: str,
        peer_flags: list[list[str]],
        rate: str | None,
        rounds: int,
        seed: int = args.seeds[0],
    ) -> dict:
        print(
            f"== {part} {name} (seed {seed}): {len(peer_flags)} peers, "
            f"{rounds} rounds of {args.inner_steps} steps",
            flush=True,
        )
        begin = time.monotonic()
        reports = run_swarm(
            len(peer_flags),
            None if rate is None else [rate],
            rounds,
            logs / part / f"{name.replace('/', '_')}_seed{seed}",
            common(seed),
            peer_flags=peer_flags,
        )
        row = summarize(reports, tokens_per_step, args.inner_steps)
        row["launcher_seconds"] = time.monotonic() - begin
        for key in (
            "full_final_eval_loss",
            "pipeline_final_eval_loss",
            "pipeline_tokens_per_s",
            "hop_bytes_per_token",
        ):
            if key in row:
                print(f"   {key} {row[key]:.3f}", flush=True)
        return row

    if "codec" in args.parts:
        by_seed = {
            seed: {
                spec: run("codec", spec, stage_flags(spec), None, args.rounds, seed)
                for spec in args.codecs
            }
            for seed in args.seeds
        }
        for rows in by_seed.values():
            base = rows.get("none")
            for row in rows.values():
                if base:
                    row["eval_loss_vs_none"] = (
                        row["pipeline_final_eval_loss"] / base["pipeline_final_eval_loss"] - 1
                    )
                    row["hop_bytes_ratio_vs_none"] = (
                        base["hop_bytes_per_token"] / row["hop_bytes_per_token"]
                    )
        results["codec"] = by_seed[
            args.seeds[0]
        ]  # the plot's curves and the table's bytes: the first seed
        if len(args.seeds) > 1:
            results["codec_by_seed"] = {str(seed): rows for seed, rows in by_seed.items()}
            for spec, row in results["codec"].items():
                finals = [by_seed[seed][spec]["pipeline_final_eval_loss"] for seed in args.seeds]
                row["final_eval_loss_by_seed"] = finals
                row["mean_final_eval_loss"] = sum(finals) / len(finals)
                if "eval_loss_vs_none" in row:
                    ratios = [by_seed[seed][spec]["eval_loss_vs_none"] for seed in args.seeds]
                    row["eval_loss_vs_none_by_seed"] = ratios
                    row["mean_eval_loss_vs_none"] = sum(ratios) / len(ratios)
    if "mixed" in args.parts:
        results["mixed"] = {
            name: run("mixed", name, flags, None, args.rounds)
            for name, flags in mixed_runs(args.mixed_activation).items()
        }
        results["mixed_activation"] = args.mixed_activation
    if "wan" in args.parts and args.rates:
        results["wan"] = {
            rate: {
                spec: run("wan", f"{rate}/{spec}", stage_flags(spec), rate, args.wan_rounds)
                for spec in args.codecs
            }
            for rate in args.rates
        }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": "python scripts/bench_pipeline.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "stages": STAGES,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "inner_steps": args.inner_steps,
        "tokens_per_step": tokens_per_step,
        "results": results,
    }
    try:
        document["plot"] = plot(results, out, args.model)
    except ImportError:
        document["plot"] = "matplotlib not installed (pip install -e '.[plot]')"
    out.write_text(json.dumps(document, indent=1))

    print(
        f"{'codec':<13} {'B/token/payload':>15} {'wire B/token/payload':>20} {'ratio':>7} "
        f"{'tokens/s':>9} {'final eval':>10} {'vs none':>8}"
    )
    for spec, row in results.get("codec", {}).items():
        print(
            f"{spec:<17} {results['codec_bytes'][spec]['bytes_per_token']:15.1f} "
            f"{row['hop_bytes_per_token_per_payload']:20.1f} "
            f"{row.get('hop_bytes_ratio_vs_none', float('nan')):7.1f} "
            f"{row['pipeline_tokens_per_s']:9.0f} {row['pipeline_final_eval_loss']:10.3f} "
            f"{row.get('eval_loss_vs_none', float('nan')):+8.1%}"
            + (
                f"   seeds {args.seeds}: "
                + " ".join(f"{v:+.1%}" for v in row["eval_loss_vs_none_by_seed"])
                + f", mean {row['mean_eval_loss_vs_none']:+.1%}"
                if "mean_eval_loss_vs_none" in row
                else ""
            )
        )
    for name, row in results.get("mixed", {}).items():
        print(
            f"mixed {name:<14} full {row.get('full_final_eval_loss', float('nan')):.3f}  "
            f"pipeline {row.get('pipeline_final_eval_loss', float('nan')):.3f}"
        )
    for rate, rows in results.get("wan", {}).items():
        for spec, row in rows.items():
            print(f"wan {rate:<8} {spec:<13} {row['pipeline_tokens_per_s']:9.0f} tokens/s")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
