"""Event-loop lag of real peers: does the loop only wait (house rule 13)?

    python scripts/bench_loop.py --model large --peers 3 --rounds 3 \
        --out results/bench_loop_large.json

Starts `--peers` `shoal peer` processes on 127.0.0.1 (port 0; each prints the URL it
serves at), all bootstrapping from the first and waiting for each other, and runs them for
`--rounds` outer rounds. Every `--poll` seconds it asks each peer for `/api/swarm` and
records the peer's own worst event-loop lag over the last 60 s (`loop_lag_s_max`, measured
by `peer/looplag.py`; the peer's gossiped `loop_lag_ms_max` if that is all there is), plus
how long the request took and whether it was answered at all (a held loop answers late or
not in time). Before each peer is done it scrapes `/metrics` for
`shoal_loop_lag_seconds_max`, and at the end it reads each peer's `--report`
(`loop_lag_s_max`: the last 60 s). A peer's result is the largest lag seen over the run.
With `--asyncio-debug` the peers run in asyncio's debug mode, which logs every callback or
task step that holds the loop over 100 ms; the slowest are listed per peer (a task step is
named by the line it next waits at: the work that held the loop ends just before it).
Each peer's peak resident memory is read from /proc (a large preset on a small machine can
run out of memory: a peer killed by SIGKILL is reported as such).

Output: JSON (`--out`) with the settings, the model's parameter count, wall time, per peer
{peer_id, max_loop_lag_ms, samples, ...} and `goal_ms` / `met` (every peer within the
goal), and a table on stdout. Every wait is bounded by `--timeout`; every process started
is stopped on every way out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shoal.peer.demo import peer_error, serving_url, stop_all

GOAL_MS = 100.0
METRIC = re.compile(r"^shoal_loop_lag_seconds_max (\S+)$", re.MULTILINE)
SLOW_CALLBACK = re.compile(r"Executing (.*) took (\d+(?:\.\d+)?) seconds")  # asyncio debug
TASK_STEP = re.compile(r"coro=<(\S+) (?:running at|done, defined at) ([^>\s]+)")
HANDLE = re.compile(r"^<(?:Timer)?Handle (?:when=\S+ )?([^\s(]+)")
NO_LAG = (
    "{peer} answers /api/swarm without loop_lag_s_max or its own loop_lag_ms_max: this "
    "shoal does not export event-loop lag yet (peer/looplag.py's LoopLagMonitor must be "
    "wired into peer/node.py)"
)


class BenchError(RuntimeError):
    """The run could not be measured (a peer failed, a bound ran out, a field is missing)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="large", help="model preset (default: large)")
    parser.add_argument("--peers", type=int, default=3, help="peer processes (default: 3)")
    parser.add_argument("--rounds", type=int, default=3, help="outer rounds (default: 3)")
    parser.add_argument("--inner-steps", type=int, default=2, help="H per round (default: 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per inner step")
    parser.add_argument("--seq-len", type=int, default=64, help="bytes per sequence")
    parser.add_argument("--codec", default=None, help="pseudo-gradient codec (peer default)")
    parser.add_argument("--eval-batches", type=int, default=2, help="held-out batches per eval")
    parser.add_argument("--data", default=None, help="corpus (peer default: Python's stdlib)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between polls")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=2.0,
        help="seconds a poll waits for a peer's answer",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="overall bound in seconds: then every peer is killed and it fails",
    )
    parser.add_argument("--goal-ms", type=float, default=GOAL_MS, help="lag goal per peer")
    parser.add_argument(
        "--asyncio-debug",
        action="store_true",
        help="run the peers in asyncio debug mode: every callback or task step that holds "
        "the loop over 100 ms is logged with its name, and the slowest are reported "
        "(debug mode slows the peers somewhat)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default: results/bench_loop_<model>.json)"
    )
    parser.add_argument(
        "--keep-logs",
        default=None,
        help="folder for the peers' logs and reports (default: a temporary one, "
        "kept only when the run fails)",
    )
    args = parser.parse_args(argv)
    if args.peers < 1:
        parser.error("--peers must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not (args.poll > 0 and args.request_timeout > 0 and args.timeout > 0):
        parser.error("--poll, --request-timeout and --timeout must be > 0")
    args.out = args.out or f"results/bench_loop_{args.model}.json"
    return args


def peer_command(
    args: argparse.Namespace, i: int, folder: Path, bootstrap: str | None
) -> list[str]:
    cmd = [
        sys.executable, "-m", "shoal.peer.cli", "peer", "--listen", "127.0.0.1:0",
        "--peer-id", f"peer-{i}", "--model", args.model,
        "--inner-steps", str(args.inner_steps), "--batch-size", str(args.batch_size),
        "--seq-len", str(args.seq_len), "--rounds", str(args.rounds), "--threads", "1",
        "--min-peers", str(args.peers), "--min-peers-timeout", str(args.timeout),
        "--eval-batches", str(args.eval_batches), "--report", str(folder / f"peer-{i}.json"),
    ]  # fmt: skip
    if args.codec:
        cmd += ["--codec", args.codec]
    if args.data:
        cmd += ["--data", args.data]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    return cmd


def wait_for_url(log_path: Path, proc: subprocess.Popen, deadline: float) -> str:
    """The URL the peer prints once it serves (`shoal peer ID serving URL ...`)."""
    try:
        return serving_url(log_path, proc, max(0.0, deadline - time.monotonic()))
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


def exit_message(peer_id: str, proc: subprocess.Popen, folder: Path) -> str:
    code = proc.returncode
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        how += " (out of memory? see dmesg)" if code == -signal.SIGKILL else ""
    else:
        how = f"exited with code {code}"
    return f"{peer_id} {how}; its last line: {peer_error(folder / f'{peer_id}.log')}"


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (Linux; 0 where unknown)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def fetch(url: str, timeout_s: float) -> tuple[bytes | None, float]:
    """(body or None when unanswered, seconds the request took)."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.read(), time.monotonic() - started
    except OSError:
        return None, time.monotonic() - started


def own_lag_ms(snapshot: dict[str, Any]) -> float | None:
    """The peer's own worst loop lag (ms): the snapshot's top-level value (fresh), else its
    own entry in the peer table (as of its last heartbeat)."""
    top = snapshot.get("loop_lag_s_max")
    if isinstance(top, (int, float)) and not isinstance(top, bool):
        return 1000.0 * float(top)
    for entry in snapshot.get("peers") or []:
        if isinstance(entry, dict) and entry.get("peer_id") == snapshot.get("self_id"):
            value = entry.get("loop_lag_ms_max")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


class PeerWatch:
    """What the bench saw of one peer."""

    def __init__(self, peer_id: str, url: str) -> None:
        self.peer_id, self.url = peer_id, url
        self.series: list[tuple[float, float]] = []  # (seconds since start, lag ms)
        self.timed_out = 0  # polls not answered within the request timeout: a held loop
        self.failed = 0  # refused or reset (a peer shutting down closes its socket first)
        self.max_request_ms = 0.0
        self.round = 0
        self.params: int | None = None
        self.metrics_lag_ms: float | None = None
        self.peak_rss_mb = 0.0

    def poll(self, since: float, timeout_s: float, final_round: int) -> None:
        body, took_s = fetch(self.url + "/api/swarm", timeout_s)
        self.max_request_ms = max(self.max_request_ms, 1000 * took_s)
        if body is None:
            if took_s >= 0.9 * timeout_s:
                self.timed_out += 1
            else:
                self.failed += 1
            return
        try:
            snapshot = json.loads(body)
        except ValueError as exc:
            raise BenchError(f"{self.peer_id} answered /api/swarm with no JSON: {exc}") from exc
        lag_ms = own_lag_ms(snapshot)
        if lag_ms is None:
            raise BenchError(NO_LAG.format(peer=self.peer_id))
        self.series.append((round(time.monotonic() - since, 2), round(lag_ms, 3)))
        self.round = snapshot.get("round") or 0
        run = snapshot.get("run") if isinstance(snapshot.get("run"), dict) else {}
        self.params = run.get("params") or self.params
        if self.round >= final_round or self.metrics_lag_ms is None:
            self.scrape_metrics(timeout_s)  # once early, then while it may be about to exit

    def scrape_metrics(self, timeout_s: float) -> None:
        body, _ = fetch(self.url + "/metrics", timeout_s)
        match = METRIC.search(body.decode(errors="replace")) if body is not None else None
        if match:
            self.metrics_lag_ms = 1000 * float(match.group(1))

    def result(self, report: dict[str, Any] | None, log_path: Path) -> dict[str, Any]:
        report_lag_s = (report or {}).get("loop_lag_s_max")
        seen = [lag for _, lag in self.series]
        return {
            "peer_id": self.peer_id,
            "max_loop_lag_ms": max(seen) if seen else None,
            "samples": len(seen),
            "timed_out_polls": self.timed_out,
            "failed_polls": self.failed,
            "max_request_ms": round(self.max_request_ms, 1),
            "peak_rss_mb": round(self.peak_rss_mb),
            "metrics_loop_lag_ms": self.metrics_lag_ms,
            "report_loop_lag_ms": 1000 * report_lag_s if report_lag_s is not None else None,
            "task_failures": (report or {}).get("task_failures"),
            "slow_callbacks": slow_callbacks(log_path),
            "series": self.series,
        }


def holder(what: str) -> str:
    """`Engine.step() at peer/engine.py:260` from asyncio's long repr of a task or handle."""
    if match := TASK_STEP.search(what):
        return f"{match.group(1)} at {match.group(2).replace(os.getcwd() + os.sep, '')}"
    if match := HANDLE.search(what):
        return match.group(1)
    return what[:200]


def slow_callbacks(log_path: Path, keep: int = 5) -> list[dict[str, Any]]:
    """The slowest loop holders asyncio's debug mode logged (none without --asyncio-debug)."""
    found = [
        {"seconds": float(m.group(2)), "what": holder(m.group(1))}
        for m in SLOW_CALLBACK.finditer(log_path.read_text(errors="replace"))
    ]
    return sorted(found, key=lambda c: -c["seconds"])[:keep]


def run_bench(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + args.timeout
    procs: list[subprocess.Popen] = []
    watches: list[PeerWatch] = []
    env = {**os.environ, "PYTHONASYNCIODEBUG": "1"} if args.asyncio_debug else None
    try:
        for i in range(args.peers):
            bootstrap = watches[0].url if watches else None
            log_path = folder / f"peer-{i}.log"
            with open(log_path, "w") as log:
                procs.append(
                    subprocess.Popen(
                        peer_command(args, i, folder, bootstrap),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
            watches.append(PeerWatch(f"peer-{i}", wait_for_url(log_path, procs[-1], deadline)))
        startup_s = time.monotonic() - started
        print(f"{args.peers} peers serving: " + " ".join(w.url for w in watches), flush=True)
        with ThreadPoolExecutor(len(watches)) as pool:  # a held loop must not delay the others
            while any(proc.poll() is None for proc in procs):
                if time.monotonic() > deadline:
                    raise BenchError(f"the run did not end within --timeout {args.timeout:.0f} s")
                tick = time.monotonic()
                running = [w for w, p in zip(watches, procs, strict=True) if p.poll() is None]
                for done in [
                    pool.submit(w.poll, started, args.request_timeout, args.rounds) for w in running
                ]:
                    done.result()
                for watch, proc in zip(watches, procs, strict=True):
                    watch.peak_rss_mb = max(watch.peak_rss_mb, peak_rss_mb(proc.pid))
                    if proc.poll() not in (None, 0):
                        raise BenchError(exit_message(watch.peer_id, proc, folder))
                time.sleep(max(0.0, args.poll - (time.monotonic() - tick)))
        wall_s = time.monotonic() - started
    finally:
        stop_all(procs)
    reports = []
    for i in range(args.peers):
        path = folder / f"peer-{i}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
    peers = [
        w.result(r, folder / f"{w.peer_id}.log") for w, r in zip(watches, reports, strict=True)
    ]
    for peer in peers:
        if peer["samples"] == 0:
            raise BenchError(f"{peer['peer_id']} never answered /api/swarm in time")
    params = next((w.params for w in watches if w.params), None)
    params = params or next((r.get("params") for r in reports if r and r.get("params")), None)
    worst = max(p["max_loop_lag_ms"] for p in peers)
    settings = {k: getattr(args, k) for k in (
        "model", "peers", "rounds", "inner_steps", "batch_size", "seq_len", "codec",
        "eval_batches", "data", "poll", "request_timeout", "timeout", "asyncio_debug")}  # fmt: skip
    return {
        "benchmark": "bench_loop",
        "settings": settings,
        "params": params,
        "wall_s": round(wall_s, 1),
        "startup_s": round(startup_s, 1),
        "goal_ms": args.goal_ms,
        "met": worst <= args.goal_ms,
        "max_loop_lag_ms": worst,
        "rounds_reached": [w.round for w in watches],
        "peers": peers,
    }


def print_table(result: dict[str, Any]) -> None:
    head = (
        f"{'peer':<10} {'max lag ms':>10} {'samples':>8} {'timed out':>10} "
        f"{'max req ms':>10} {'/metrics ms':>11} {'report ms':>10} {'peak RSS MB':>11}"
    )
    print(head)
    print("-" * len(head))

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for p in result["peers"]:
        print(
            f"{p['peer_id']:<10} {ms(p['max_loop_lag_ms']):>10} {p['samples']:>8} "
            f"{p['timed_out_polls']:>10} {p['max_request_ms']:>10.1f} "
            f"{ms(p['metrics_loop_lag_ms']):>11} {ms(p['report_loop_lag_ms']):>10} "
            f"{p['peak_rss_mb']:>11}"
        )
    s = result["settings"]
    params = f"{result['params']:,}" if result["params"] else "?"
    print(
        f"model {s['model']} ({params} params), {s['peers']} peers, {s['rounds']} rounds of "
        f"H={s['inner_steps']}, {result['wall_s']:.0f} s; goal {result['goal_ms']:.0f} ms: "
        f"{'met' if result['met'] else 'NOT met'} (worst {result['max_loop_lag_ms']:.1f} ms)"
    )
    for p in result["peers"]:
        for slow in p["slow_callbacks"]:
            print(f"  {p['peer_id']} held the loop {slow['seconds']:.2f} s: {slow['what']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so `finally` stops the peers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    folder = Path(args.keep_logs or tempfile.mkdtemp(prefix="bench_loop_"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = run_bench(args, folder)
    except BenchError as exc:
        print(f"bench_loop: error: {exc} (peer logs in {folder})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bench_loop: interrupted (peer logs in {folder})", file=sys.stderr)
        return 130
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"wrote {out}")
    if not args.keep_logs:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
