"""Run `shoal demo` once per codec with the same seeds, data and token budget, side by
side, and report what each put on the wire and how far it got.

    python scripts/demo_codecs.py --peers 3 --rounds 6 --codecs fp32 int8 --out results/demo_codecs.json

Each run is the real thing: separate peer processes on 127.0.0.1 exchanging pseudo-
gradients over HTTP. The ratios compare the contribution bytes (pseudo-gradient traffic)
and all bytes (incl. gossip, joins and hashes) against the first codec listed, and against
what fp32 data-parallel training would have sent for the same inner steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", default="small")
    parser.add_argument("--codecs", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--out", default="results/demo_codecs.json")
    args = parser.parse_args()

    runs = {}
    for codec in args.codecs:
        with tempfile.TemporaryDirectory() as tmp:
            summary_path = Path(tmp) / "summary.json"
            cmd = [sys.executable, "-m", "shoal.peer.cli", "demo", "--peers", str(args.peers), "--rounds", str(args.rounds),
                   "--model", args.model, "--codec", codec, "--summary", str(summary_path)]
            print(f"== {codec}: {' '.join(cmd[2:])}", flush=True)
            started = time.monotonic()
            subprocess.run(cmd, check=True)
            runs[codec] = json.loads(summary_path.read_text())
            runs[codec]["command_seconds"] = round(time.monotonic() - started, 1)

    base = args.codecs[0]
    rows = []
    for codec, s in runs.items():
        rows.append({
            "codec": codec, "eval_loss_last": s["eval_loss_last"], "bytes_sent_total": s["bytes_sent_total"],
            "bytes_sent_contributions": s["bytes_sent_contributions"],
            "contribution_bytes_vs_" + base: s["bytes_sent_contributions"] / runs[base]["bytes_sent_contributions"],
            "total_bytes_vs_" + base: s["bytes_sent_total"] / runs[base]["bytes_sent_total"],
            "ddp_over_sent": s["ddp_over_sent"], "wall_seconds": s["wall_seconds"],
        })
    result = {"peers": args.peers, "rounds": args.rounds, "model": args.model, "rows": rows, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print(f"\n{'codec':6s} {'eval loss':>9s} {'contrib MB':>10s} {'vs ' + base:>8s} {'total MB':>9s} {'DDP/sent':>9s} {'wall s':>7s}")
    for r in rows:
        print(f"{r['codec']:6s} {r['eval_loss_last']:9.3f} {r['bytes_sent_contributions'] / 1e6:10.1f} "
              f"{r['contribution_bytes_vs_' + base]:8.3f} {r['bytes_sent_total'] / 1e6:9.1f} {r['ddp_over_sent']:9.1f} {r['wall_seconds']:7.1f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
