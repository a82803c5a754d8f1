r"""Bytes per peer as the swarm grows: tiny int8 DiLoCo swarms of N peer processes on loopback.

    python scripts/bench_scale.py --peers 4 8 16 32 64 --rounds 4 \
        --out results/bench_scale.json --plot results/bench_scale.png [--hivemind]

For every N this runs `shoal demo --peers N --model tiny --outer diloco --codec int8`
(N real `shoal peer` processes, 127.0.0.1, one torch thread each) and reads every peer's own
report from the demo's log folder. Per N:
* bytes sent per peer per round, rounds after the first (round 1 also carries the start-up:
  joins, the first gossip), from each peer's cumulative counters at the end of each round;
  mean and max over peers. Contributions = the pseudo-gradient kinds (`contribution`, and
  `shard` + `reduced` of reduce-scatter), exact per round; the rest of a round's bytes is
  split into gossip / state (`manifest` + `chunk`) / other (join, set, hash, kinds this
  script does not know) in the proportions of the peer's whole-run totals of those kinds
  (peers count kinds only for the whole run) — so that split is an estimate, the
  contribution / non-contribution line is not.
* round wall time: median over peers and rounds (after the first) of the time between the
  ends of consecutive rounds;
* peak RSS per peer process: VmHWM from /proc/<pid>/status of the demo's children, polled;
* `final_weights_agree` from the demo's summary; per-peer bytes relative to the smallest N.
With --hivemind (hivemind must import in this interpreter, e.g. /work/hivenv/bin/python):
one `DecentralizedAverager` step of a tensor of the tiny model's size at the same N, with
`scripts/bench_averaging.py`'s worker (uint8 compression, bytes from /proc/net/dev / N).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONTRIBUTION_KINDS = ("contribution", "shard", "reduced")  # = peer.reduce.PSEUDO_GRADIENT_KINDS
GOSSIP_KINDS = ("gossip",)
STATE_KINDS = ("manifest", "chunk")
CLASSES = ("contributions", "gossip", "state", "other")
LOGS_LINE = re.compile(r"logs in (\S+)")


def kind_class(kind: str) -> str:
    """Which of CLASSES a `Traffic` kind (a route's last path segment) counts as."""
    if kind in CONTRIBUTION_KINDS:
        return "contributions"
    if kind in GOSSIP_KINDS:
        return "gossip"
    if kind in STATE_KINDS:
        return "state"
    return "other"


def by_class(bytes_by_kind: dict[str, int]) -> dict[str, int]:
    totals = dict.fromkeys(CLASSES, 0)
    for kind, count in bytes_by_kind.items():
        totals[kind_class(kind)] += count
    return totals


def peer_rounds(report: dict[str, Any]) -> list[dict[str, float]]:
    """A peer's bytes sent in each round after the first, by class, and the round's seconds.

    Totals and contributions are exact (differences of the cumulative counters in the round
    log); the non-contribution rest is split by the peer's whole-run shares of gossip, state
    and other."""
    run = by_class(report["bytes_sent_by_kind"])
    rest_total = run["gossip"] + run["state"] + run["other"]
    shares = {
        c: (run[c] / rest_total if rest_total else 0.0) for c in ("gossip", "state", "other")
    }
    log = report["rounds"]
    rows = []
    for prev, cur in zip(log, log[1:], strict=False):
        total = cur["bytes_sent"] - prev["bytes_sent"]
        contributions = cur["contribution_bytes_sent"] - prev["contribution_bytes_sent"]
        rest = total - contributions
        rows.append(
            {
                "total": total,
                "contributions": contributions,
                **{c: rest * share for c, share in shares.items()},
                "seconds": cur["time"] - prev["time"],
            }
        )
    return rows


def swarm_row(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-peer bytes per round (mean and max over peers of each peer's mean over rounds
    after the first), by class, and the median round time, from the peers' reports."""
    per_peer = [rows for r in reports if (rows := peer_rounds(r))]
    if not per_peer:
        raise ValueError("no peer finished two rounds: nothing to measure per round")
    keys = ("total", *CLASSES)
    peer_means = [{k: statistics.fmean(row[k] for row in rows) for k in keys} for rows in per_peer]
    return {
        "peers_reporting": len(reports),
        "rounds_measured": min(len(rows) for rows in per_peer),
        "bytes_per_round_mean": {k: statistics.fmean(m[k] for m in peer_means) for k in keys},
        "bytes_per_round_max": {k: max(m[k] for m in peer_means) for k in keys},
        "round_seconds_median": statistics.median(r["seconds"] for rows in per_peer for r in rows),
        "run_bytes_sent_by_kind": sum_kinds(r["bytes_sent_by_kind"] for r in reports),
        "contributions_applied_min": min(
            len(row.get("applied", [])) for r in reports for row in r["rounds"]
        ),
    }


def sum_kinds(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for kind, value in count.items():
            total[kind] = total.get(kind, 0) + value
    return dict(sorted(total.items()))


def rss_kb(pid: int, field: str = "VmHWM") -> int | None:
    """VmHWM (peak resident set) or VmRSS (now) of a live process, in kB; None once gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def run_swarm(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One `shoal demo` of n peers; its summary, the peers' reports and their peak RSS. The
    demo runs in its own process group, killed whole on timeout or error."""
    summary_path = Path(tempfile.mkstemp(prefix=f"bench-scale-{n}-", suffix=".json")[1])
    cmd = [
        sys.executable, "-m", "shoal.peer.cli", "demo", "--peers", str(n), "--rounds",
        str(args.rounds), "--model", "tiny", "--outer", "diloco", "--codec", "int8",
        "--summary", str(summary_path), *args.demo_args,
    ]  # fmt: skip
    print("$ " + " ".join(cmd[2:]), flush=True)
    begin = time.monotonic()
    output_path = summary_path.with_suffix(".out")
    with open(output_path, "w") as output_file:
        proc = subprocess.Popen(
            cmd, stdout=output_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    peak_kb: dict[int, int] = {}
    last_kb: dict[int, int] = {}  # VmRSS at the last poll, i.e. near the end of the run
    try:
        while proc.poll() is None:
            if time.monotonic() - begin > args.timeout:
                raise TimeoutError(f"{n} peers: no result within --timeout {args.timeout:.0f} s")
            for pid in children(proc.pid):
                if (kb := rss_kb(pid)) is not None:
                    peak_kb[pid] = max(kb, peak_kb.get(pid, 0))
                    last_kb[pid] = rss_kb(pid, "VmRSS") or last_kb.get(pid, 0)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the demo stops its peers on SIGTERM...
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # ...and whatever is left goes anyway
            except ProcessLookupError:
                pass
            proc.wait()
    wall_s = time.monotonic() - begin
    output = output_path.read_text(errors="replace")
    output_path.unlink()
    print(output[-2000:] if proc.returncode else output.splitlines()[0], flush=True)
    match = LOGS_LINE.search(output)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"{n} peers: demo exited {proc.returncode}; see its output above")
    logs = Path(match.group(1))
    reports = [json.loads((logs / f"peer-{i}.json").read_text()) for i in range(n)]
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    return {"summary": summary, "reports": reports, "peak_kb": list(peak_kb.values()),
            "last_kb": list(last_kb.values()),
            "wall_s": wall_s, "logs": str(logs)}  # fmt: skip


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    run = run_swarm(n, args)
    summary = run["summary"]
    return {
        "peers": n,
        "params": summary["params"],
        "codec": summary["codec"],
        **swarm_row(run["reports"]),
        "final_weights_agree": summary["final_weights_agree"],
        "eval_loss_last": summary["eval_loss_last"],
        "peak_rss_mb_max": max(run["peak_kb"]) / 1024 if run["peak_kb"] else None,
        "peak_rss_mb_mean": statistics.fmean(run["peak_kb"]) / 1024 if run["peak_kb"] else None,
        "rss_mb_at_end_max": max(run["last_kb"]) / 1024 if run["last_kb"] else None,
        "rss_processes_seen": len(run["peak_kb"]),
        "demo_wall_s": round(run["wall_s"], 1),
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Per-peer bytes per round relative to the smallest N measured."""
    base = min(rows, key=lambda r: r["peers"])
    for row in rows:
        row["bytes_vs_smallest_n"] = (
            row["bytes_per_round_mean"]["total"] / base["bytes_per_round_mean"]["total"]
        )
        row["smallest_n"] = base["peers"]


def hivemind_rows(
    peers: list[int],
    size: int,
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
    """hivemind's DecentralizedAverager at each N, with bench_averaging.py's worker; a row
    appended to `rows` (and `save` called) after each."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_averaging import run_one

    averaging_args = argparse.Namespace(timeout=args.timeout, matchmaking=args.matchmaking)
    for n in peers:
        print(f"== hivemind-uint8: {n} peers, {size:,} elements", flush=True)
        try:
            row = run_one("hivemind-uint8", n, size, averaging_args, corpus="")
        except Exception as exc:  # did not fit (time, memory): recorded, the table goes on
            print(f"   hivemind at {n} peers failed: {exc!r}", flush=True)
            rows.append({"peers": n, "error": repr(exc)})
        else:
            print(f"   {row['seconds']:.2f} s, {row['wire_bytes_per_peer'] / 1e3:.1f} kB/peer")
            rows.append(row)
        save()


def require_hivemind() -> None:
    """Fail before any swarm runs if --hivemind cannot work in this interpreter."""
    try:
        import hivemind  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"--hivemind: hivemind does not import in {sys.executable} ({exc}); install it "
            "(`pip install hivemind`, an optional extra) or run this script with an "
            "interpreter that has it, e.g. a separate venv with shoal installed editable"
        ) from exc


def write_json(path: str, rows: list[dict], hivemind: list[dict]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python scripts/bench_scale.py " + " ".join(sys.argv[1:]),
                "cpu_count": os.cpu_count(),
                "rows": rows,
                "hivemind": hivemind,
            },
            indent=1,
        )
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'N':>3} {'kB/peer/rnd':>11} {'max':>7} {'contrib':>8} {'gossip':>7} {'state':>6} "
        f"{'other':>6} {'x N=min':>7} {'round s':>7} {'RSS MB':>7} agree"
    )
    for r in rows:
        mean, peak = r["bytes_per_round_mean"], r["bytes_per_round_max"]
        rss = f"{r['peak_rss_mb_max']:7.0f}" if r["peak_rss_mb_max"] else f"{'-':>7}"
        print(
            f"{r['peers']:3d} {mean['total'] / 1e3:11.1f} {peak['total'] / 1e3:7.1f} "
            f"{mean['contributions'] / 1e3:8.1f} {mean['gossip'] / 1e3:7.1f} "
            f"{mean['state'] / 1e3:6.1f} {mean['other'] / 1e3:6.1f} "
            f"{r['bytes_vs_smallest_n']:7.2f} {r['round_seconds_median']:7.2f} {rss} "
            f"{r['final_weights_agree']}"
        )


def plot(rows: list[dict[str, Any]], hivemind: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["peers"] for r in rows]
    ax.plot(xs, [r["bytes_per_round_mean"]["total"] / 1e3 for r in rows], "k-o", label="total")
    for c in CLASSES:
        ax.plot(xs, [r["bytes_per_round_mean"][c] / 1e3 for r in rows], "--.", label=c)
    done = [h for h in hivemind if "error" not in h]
    if done:
        ax.plot(
            [h["peers"] for h in done],
            [h["wire_bytes_per_peer"] / 1e3 for h in done],
            "r:s",
            label="hivemind uint8 (one step, wire)",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("peers N")
    ax.set_ylabel("kB sent per peer per round")
    ax.set_title(f"tiny int8 DiLoCo ({rows[0]['params']:,} params), loopback")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=4, help="outer rounds per swarm (>= 2)")
    parser.add_argument("--out", default="results/bench_scale.json")
    parser.add_argument("--plot", default=None, help="PNG of bytes per peer per round vs N")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per swarm")
    parser.add_argument("--hivemind", action="store_true", help="also hivemind at each N")
    parser.add_argument(
        "--matchmaking", type=float, default=1.0, help="hivemind's min_matchmaking_time"
    )
    parser.add_argument(
        "--demo-args",
        default="",
        help="more `shoal demo` flags, one string, e.g. '--exchange gather --gather-timeout 60'",
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first round is not measured)")
    args.demo_args = args.demo_args.split()
    if args.hivemind:
        require_hivemind()
    rows: list[dict[str, Any]] = []
    hivemind: list[dict[str, Any]] = []

    def save() -> None:  # after every swarm and hivemind run, so a killed run keeps its rows
        write_json(args.out, rows, hivemind)

    for n in args.peers:
        try:
            rows.append(measure(n, args))
        except (RuntimeError, TimeoutError, ValueError) as exc:
            print(f"bench_scale: {exc}", file=sys.stderr)
            rows.append({"peers": n, "error": str(exc)})
        save()
    done = [r for r in rows if "error" not in r]
    if done:
        add_ratios(done)
        print_table(done)
        save()
    if args.hivemind and done:
        hivemind_rows(args.peers, done[0]["params"], args, hivemind, save)
    print(f"written to {args.out}")
    if args.plot and done:
        plot(done, hivemind, args.plot)
        print(f"plot written to {args.plot}")
    return 0 if len(done) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
