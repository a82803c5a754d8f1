"""`shoal demo`: a local swarm of peer processes on 127.0.0.1, a dashboard, a summary.

Every peer is a separate `shoal peer` process (real sockets, real tensors); the demo only
starts them, watches the first peer's `/api/swarm`, and reads each peer's JSON report when
they finish. Whatever happens (end of run, Ctrl-C, an error), every process it started is
stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from shoal.peer.cli import run_config_from

STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch_json(url: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.load(resp)
    except (OSError, ValueError):
        return None


def run_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--model", args.model, "--outer", args.outer, "--seed", str(args.seed)]
    for flag in ("codec", "outer_lr", "outer_momentum", "error_decay", "topk", "fragments", "overlap", "mix", "inner_steps", "inner_lr", "batch_size", "seq_len", "data"):
        value = getattr(args, flag)
        if value is not None:
            flags += ["--" + flag.replace("_", "-"), str(value)]
    return flags


def stop_all(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summarize(args: argparse.Namespace, reports: list[dict], wall_s: float) -> dict[str, Any]:
    run = run_config_from(args)
    first = reports[0]
    evals = [r["eval_loss"] for r in first["rounds"]]
    params = first["params"]
    n, steps = len(reports), sum(r["inner_steps_total"] for r in reports)
    # fp32 ring all-reduce: each peer sends 2(n-1)/n of the gradient every inner step
    ddp_bytes = int(steps * 2 * (n - 1) / n * 4 * params) if n > 1 else 0
    sent = sum(r["bytes_sent"] for r in reports)
    contribution_bytes = sum(r["bytes_sent_by_kind"].get("contribution", 0) for r in reports)
    final_hashes = {r["rounds"][-1]["weights_hash"] for r in reports if r["rounds"]}
    return {
        "peers": n, "rounds": len(evals), "model": args.model, "params": params, "codec": run.outer.codec, "outer": args.outer,
        "inner_steps": run.inner_steps, "tokens_total": steps * run.inner.batch_size * run.inner.seq_len,
        "eval_loss_initial": first["initial_eval_loss"],
        "eval_loss_first": evals[0] if evals else None, "eval_loss_last": evals[-1] if evals else None,
        "eval_loss_per_round": evals,
        # cumulative over the swarm, at the end of each round (peers' own counters)
        "bytes_sent_per_round": [sum(r["rounds"][i]["bytes_sent"] for r in reports if i < len(r["rounds"])) for i in range(len(evals))],
        "bytes_sent_total": sent, "bytes_sent_contributions": contribution_bytes,
        "bytes_sent_by_peer": {r["peer_id"]: r["bytes_sent"] for r in reports},
        "bytes_ddp_equivalent": ddp_bytes, "ddp_over_sent": ddp_bytes / sent if sent else None,
        "final_weights_agree": len(final_hashes) == 1, "wall_seconds": round(wall_s, 1),
    }


def run_demo(args: argparse.Namespace) -> int:
    if args.peers < 1:
        raise ValueError(f"--peers must be >= 1, got {args.peers}")
    run_config_from(args)  # validate the flags before starting anything
    workdir = Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    threads = max(1, (os.cpu_count() or 1) // args.peers)
    ports = [args.port or free_port()] + [free_port() for _ in range(args.peers - 1)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs: list[subprocess.Popen] = []
    logs = []
    start = time.monotonic()
    try:
        for i, port in enumerate(ports):
            cmd = [sys.executable, "-m", "shoal.peer.cli", "peer", "--listen", f"127.0.0.1:{port}", "--peer-id", f"peer-{i}",
                   "--rounds", str(args.rounds), "--min-peers", str(args.peers), "--threads", str(threads), "--report", str(workdir / f"peer-{i}.json"), *run_flags(args)]
            if i > 0:
                cmd += ["--bootstrap", urls[0]]
            env = dict(os.environ, SHOAL_SWARM_KEY=args.swarm_key or "")
            logs.append(open(workdir / f"peer-{i}.log", "w"))
            procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
            if i == 0:
                wait_until_serving(urls[0], procs[0], workdir)
                print(f"shoal demo: {args.peers} peers, {args.rounds} rounds of {args.model}; logs in {workdir}")
                print(f"dashboard: {urls[0]}/", flush=True)
        watch(urls, procs, args.rounds)
        wall_s = time.monotonic() - start
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            print(f"shoal demo: peers {failed} exited with errors; see {workdir}", file=sys.stderr)
            return 1
        reports = [json.loads((workdir / f"peer-{i}.json").read_text()) for i in range(args.peers)]
        summary = summarize(args, reports, wall_s)
        print_summary(summary)
        if args.summary:
            Path(args.summary).write_text(json.dumps(summary, indent=1))
            print(f"summary written to {args.summary}")
        return 0
    except KeyboardInterrupt:
        print("\nshoal demo: interrupted; stopping peers", file=sys.stderr)
        return 130
    finally:
        stop_all(procs)
        for f in logs:
            f.close()


def wait_until_serving(url: str, proc: subprocess.Popen, workdir: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while fetch_json(url + "/api/swarm") is None:
        if proc.poll() is not None:
            raise RuntimeError(f"the first peer exited during start-up; see {workdir / 'peer-0.log'}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the first peer did not serve within {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.3)


def watch(urls: list[str], procs: list[subprocess.Popen], rounds: int) -> None:
    """Print a line per finished round until every peer process has exited."""
    shown = 0
    while any(p.poll() is None for p in procs):
        snapshot = next((s for u, p in zip(urls, procs, strict=True) if p.poll() is None and (s := fetch_json(u + "/api/swarm"))), None)
        if snapshot is not None:
            peers = snapshot["peers"]
            done = min((p["round"] for p in peers if p["alive"]), default=0)
            if done > shown:
                shown = done
                me = next(p for p in peers if p["peer_id"] == snapshot["self_id"])
                alive = sum(p["alive"] for p in peers)
                sent = sum(p["bytes_sent"] for p in peers)
                print(f"round {done}/{rounds}  eval loss {me['eval_loss']:.3f}  peers alive {alive}  sent {sent / 1e6:.1f} MB", flush=True)
        time.sleep(1.0)


def print_summary(summary: dict[str, Any]) -> None:
    print("\nsummary")
    for key in ("peers", "rounds", "model", "params", "codec", "eval_loss_initial", "eval_loss_first", "eval_loss_last",
                "bytes_sent_total", "bytes_sent_contributions", "bytes_ddp_equivalent", "ddp_over_sent", "final_weights_agree", "wall_seconds"):
        value = summary[key]
        print(f"  {key:26s} {value:.3f}" if isinstance(value, float) else f"  {key:26s} {value}")
