"""Outer optimizers and codecs side by side: the same seeds, data, peers and token budget.

    python scripts/bench_outer.py --peers 3 --rounds 6 \
        --methods diloco:fp32 diloco:int8 sparseloco:topk --out results/bench_outer.json

Each method is one real `shoal demo` run: separate peer processes on 127.0.0.1 exchanging
pseudo-gradients over HTTP. Reports eval loss per round and bytes sent per peer; ratios
are against the first method listed (the dense baseline) and against what fp32
data-parallel training would have sent for the same inner steps. Writes JSON and a PNG
of eval loss against bytes sent. "sign+verify" is the largest share of a peer's training
time (its first inner step to its report) that its process spent in Ed25519 signing and
verifying, measured by the peers themselves (`peer.identity.CryptoClock`; from the
process's start, so the join's work counts too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run_method(method: str, args: argparse.Namespace) -> dict:
    outer, _, codec = method.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [
            sys.executable,
            "-m",
            "shoal.peer.cli",
            "demo",
            "--peers",
            str(args.peers),
            "--rounds",
            str(args.rounds),
            "--model",
            args.model,
            "--outer",
            outer,
            "--summary",
            str(summary_path),
            *args.extra,
        ]
        if codec:
            cmd += ["--codec", codec]
        if args.inner_steps:
            cmd += ["--inner-steps", str(args.inner_steps)]
        print(f"== {method}: shoal {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(summary_path.read_text())


def plot(runs: dict[str, dict], peers: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, s in runs.items():
        per_peer_mb = [0.0] + [b / peers / 1e6 for b in s["bytes_sent_per_round"]]
        ax.plot(
            per_peer_mb,
            [s["eval_loss_initial"], *s["eval_loss_per_round"]],
            marker="o",
            label=method,
        )
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("MB sent per peer (cumulative)")
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title(f"{peers} peers, same token budget")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", default="small")
    parser.add_argument("--inner-steps", type=int)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["diloco:fp32", "diloco:int8", "sparseloco:topk"],
        help="OUTER[:CODEC] ...",
    )
    parser.add_argument("--out", default="results/bench_outer.json")
    parser.add_argument("extra", nargs="*", help="more flags for every `shoal demo` (after --)")
    args = parser.parse_args()

    runs = {m: run_method(m, args) for m in args.methods}
    base_name = args.methods[0]
    base = runs[base_name]
    rows = []
    for method, s in runs.items():
        rows.append(
            {
                "method": method,
                "eval_loss_last": s["eval_loss_last"],
                "eval_loss_vs_base": s["eval_loss_last"] / base["eval_loss_last"] - 1.0,
                "bytes_sent_per_peer": s["bytes_sent_total"] / s["peers"],
                "contribution_bytes_per_peer": s["bytes_sent_contributions"] / s["peers"],
                "contribution_bytes_vs_base": s["bytes_sent_contributions"]
                / base["bytes_sent_contributions"],
                "bits_per_param_per_round": 8
                * s["bytes_sent_contributions"]
                / (s["peers"] * (s["peers"] - 1) * s["rounds"] * s["params"])
                if s["peers"] > 1
                else None,
                "ddp_over_sent": s["ddp_over_sent"],
                "wall_seconds": s["wall_seconds"],
                # the largest share of a peer's training time spent signing and verifying
                "identity_share_max": max(
                    (v for v in s.get("identity_share_per_peer", {}).values() if v is not None),
                    default=None,
                ),
            }
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "peers": args.peers,
                "rounds": args.rounds,
                "model": args.model,
                "base": base_name,
                "rows": rows,
                "runs": runs,
            },
            indent=1,
        )
    )
    plot(runs, args.peers, out.with_suffix(".png"))

    print(
        f"\n{'method':18s} {'eval loss':>9s} {'vs base':>8s} {'MB/peer':>8s} "
        f"{'contrib vs base':>15s} {'bits/param':>10s} {'DDP/sent':>9s} {'wall s':>7s} "
        f"{'sign+verify':>11s}"
    )
    for r in rows:
        bits = r["bits_per_param_per_round"]
        share = r["identity_share_max"]
        print(
            f"{r['method']:18s} {r['eval_loss_last']:9.3f} {r['eval_loss_vs_base']:+8.2%} "
            f"{r['bytes_sent_per_peer'] / 1e6:8.2f} {r['contribution_bytes_vs_base']:15.4f} "
            f"{bits if bits is None else f'{bits:.3f}':>10} "
            f"{r['ddp_over_sent']:9.1f} {r['wall_seconds']:7.1f} "
            f"{'-' if share is None else f'{share:.2%}':>11}"
        )
    print(f"written to {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
