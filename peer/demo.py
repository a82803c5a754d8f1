"""`shoal demo`: a local swarm of peer processes on 127.0.0.1, a dashboard, a summary.

Every peer is a separate `shoal peer` process (real sockets, real tensors); the demo only
starts them, watches the first peer's `/api/swarm`, and reads each peer's JSON report when
they finish. Whatever happens (end of run, Ctrl-C, an error), every process it started is
stopped before it returns.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from shoal.peer.cli import DEMO_GROUPS, DemoSettings, run_config_from
from shoal.peer.options import build_section, flag_fields, key_name
from shoal.peer.reduce import PSEUDO_GRADIENT_KINDS

STARTUP_TIMEOUT_S = 120.0
SERVING = re.compile(r"^shoal peer \S+ serving (http://\S+) ")


def fetch_json(url: str, timeout_s: float = 2.0) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return json.load(resp)
    except (OSError, ValueError):
        return None


def peer_settings_toml(values: dict[str, Any]) -> str:
    """The settings every demo peer shares (run, data, protocol), as `--config` TOML."""
    lines = []
    for name, section in DEMO_GROUPS.items():
        if name == "demo":
            continue
        for f in flag_fields(section):
            key = key_name(f)
            if key in values and values[key] is not None:
                lines.append(f"{key} = {_toml_value(values[key])}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def serving_url(log_path: Path, proc: subprocess.Popen, timeout_s: float) -> str:
    """The URL a peer started with `--listen 127.0.0.1:0` reports once serving (its log's
    `shoal peer ID serving URL` line); RuntimeError with the peer's own error line if it
    exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in log_path.read_text(errors="replace").splitlines():
            if match := SERVING.match(line):
                return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"{log_path.stem} exited during start-up: {peer_error(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{log_path.stem} did not serve within {timeout_s:.0f} s; see {log_path}"
            )
        time.sleep(0.2)


def peer_error(log_path: Path) -> str:
    """A dead peer's own error line (`shoal: error: ...`), else its log's last line."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [
        line.removeprefix("shoal: error: ") for line in lines if line.startswith("shoal: error:")
    ]
    return errors[-1] if errors else (lines[-1] if lines else "(no output)")


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


def summarize(values: dict[str, Any], reports: list[dict], wall_s: float) -> dict[str, Any]:
    run = run_config_from(values)
    first = reports[0]
    evals = [r["eval_loss"] for r in first["rounds"]]
    params = first["params"]
    n, steps = len(reports), sum(r["inner_steps_total"] for r in reports)
    # fp32 ring all-reduce: each peer sends 2(n-1)/n of the gradient every inner step
    ddp_bytes = int(steps * 2 * (n - 1) / n * 4 * params) if n > 1 else 0
    sent = sum(r["bytes_sent"] for r in reports)
    contribution_bytes = sum(
        r["bytes_sent_by_kind"].get(kind, 0) for r in reports for kind in PSEUDO_GRADIENT_KINDS
    )
    # peers that hold the same tensors (full replicas; the peers of one stage) end bit-equal
    final_hashes: dict[tuple, set[str]] = {}
    for r in reports:
        if r["rounds"]:
            final_hashes.setdefault((r["role"], r["stage"]), set()).add(
                r["rounds"][-1]["weights_hash"]
            )
    return {
        "peers": n,
        "rounds": len(evals),
        "model": run.model_preset,
        "params": params,
        "codec": run.outer.codec,
        "outer": run.outer.name,
        "stages": run.stages,
        "inner_steps": run.inner_steps,
        "tokens_total": steps * run.inner.grad_accum * run.inner.batch_size * run.inner.seq_len,
        "eval_loss_initial": first["initial_eval_loss"],
        "eval_loss_first": evals[0] if evals else None,
        "eval_loss_last": evals[-1] if evals else None,
        "eval_loss_per_round": evals,
        # cumulative over the swarm, at the end of each round (peers' own counters)
        "bytes_sent_per_round": [
            sum(r["rounds"][i]["bytes_sent"] for r in reports if i < len(r["rounds"]))
            for i in range(len(evals))
        ],
        "bytes_sent_total": sent,
        "bytes_sent_contributions": contribution_bytes,
        "bytes_sent_by_peer": {r["peer_id"]: r["bytes_sent"] for r in reports},
        "bytes_ddp_equivalent": ddp_bytes,
        "ddp_over_sent": ddp_bytes / sent if sent else None,
        "final_weights_agree": all(len(h) == 1 for h in final_hashes.values()),
        "wall_seconds": round(wall_s, 1),
        # each peer process's Ed25519 time against its time from round 0 to its report
        "identity_share_per_peer": {r["peer_id"]: identity_share(r) for r in reports},
    }


def identity_share(report: dict[str, Any]) -> float | None:
    """The share of a peer's training time (round 0 to its report) spent signing and
    verifying (`peer.identity.CryptoClock`)."""
    clock, began = report.get("identity"), report.get("train_started_at")
    if not clock or began is None or report["finished_at"] <= began:
        return None
    return (clock["sign_s"] + clock["verify_s"]) / (report["finished_at"] - began)


def run_demo(values: dict[str, Any]) -> int:
    demo: DemoSettings = build_section(DemoSettings, values)
    if demo.peers < 1:
        raise ValueError(f"--peers must be >= 1, got {demo.peers}")
    run = run_config_from(values)  # validate the flags before starting anything
    workdir = Path(tempfile.mkdtemp(prefix="shoal-demo-"))
    settings = workdir / "run.toml"
    settings.write_text(peer_settings_toml(values))
    roles = [[] for _ in range(demo.peers)] + [
        ["--role", "stage", "--stage", str(s)] for s in range(run.stages)
    ]
    threads = max(1, (os.cpu_count() or 1) // len(roles))
    env = dict(
        os.environ, SHOAL_SWARM_KEY=demo.swarm_key or os.environ.get("SHOAL_SWARM_KEY") or ""
    )
    procs: list[subprocess.Popen] = []
    urls: list[str] = []
    start = time.monotonic()
    try:
        for i, role in enumerate(roles):
            port = demo.port if i == 0 else 0
            cmd = [
                sys.executable,
                "-m",
                "shoal.peer.cli",
                "peer",
                "--config",
                str(settings),
                "--listen",
                f"127.0.0.1:{port}",
                "--peer-id",
                f"peer-{i}",
                "--rounds",
                str(demo.rounds),
                "--min-peers",
                str(len(roles)),
                "--threads",
                str(threads),
                "--report",
                str(workdir / f"peer-{i}.json"),
                *role,
            ]
            if i > 0:
                cmd += ["--bootstrap", urls[0]]
            if demo.checkpoint_dir:
                cmd += ["--checkpoint-dir", str(Path(demo.checkpoint_dir, f"peer-{i}"))]
            with open(workdir / f"peer-{i}.log", "w") as log_file:
                procs.append(
                    subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                )
            urls.append(serving_url(workdir / f"peer-{i}.log", procs[-1], STARTUP_TIMEOUT_S))
            if i == 0:
                pipeline = f" and a {run.stages}-stage pipeline replica" if run.stages else ""
                print(
                    f"shoal demo: {demo.peers} peers{pipeline}, {demo.rounds} rounds of "
                    f"{run.model_preset}; "
                    f"logs in {workdir}"
                )
                print(f"dashboard: {urls[0]}/", flush=True)
        watch(urls, procs, demo.rounds)
        wall_s = time.monotonic() - start
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            for i in failed:
                print(
                    f"shoal demo: peer-{i}: {peer_error(workdir / f'peer-{i}.log')}",
                    file=sys.stderr,
                )
            print(f"shoal demo: peers {failed} exited with errors; see {workdir}", file=sys.stderr)
            return 1
        reports = [json.loads((workdir / f"peer-{i}.json").read_text()) for i in range(len(roles))]
        summary = summarize(values, reports, wall_s)
        print_summary(summary)
        if demo.summary:
            Path(demo.summary).write_text(json.dumps(summary, indent=1))
            print(f"summary written to {demo.summary}")
        return 0
    except RuntimeError as exc:  # a peer that did not start: its own error, no traceback
        print(f"shoal demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nshoal demo: interrupted; stopping peers", file=sys.stderr)
        return 130
    finally:
        stop_all(procs)


def watch(urls: list[str], procs: list[subprocess.Popen], rounds: int) -> None:
    """Print a line per finished round until every peer process has exited."""
    shown = 0
    while any(p.poll() is None for p in procs):
        snapshot = next(
            (
                s
                for u, p in zip(urls, procs, strict=True)
                if p.poll() is None and (s := fetch_json(u + "/api/swarm"))
            ),
            None,
        )
        if snapshot is not None:
            peers = snapshot["peers"]
            done = min((p["round"] for p in peers if p["alive"]), default=0)
            if done > shown:
                shown = done
                me = next(p for p in peers if p["peer_id"] == snapshot["self_id"])
                alive = sum(p["alive"] for p in peers)
                sent = sum(p["bytes_sent"] for p in peers)
                print(
                    f"round {done}/{rounds}  eval loss {me['eval_loss']:.3f}  peers alive "
                    f"{alive}  sent {sent / 1e6:.1f} MB",
                    flush=True,
                )
        time.sleep(1.0)


def print_summary(summary: dict[str, Any]) -> None:
    print("\nsummary")
    for key in (
        "peers",
        "rounds",
        "model",
        "params",
        "codec",
        "eval_loss_initial",
        "eval_loss_first",
        "eval_loss_last",
        "bytes_sent_total",
        "bytes_sent_contributions",
        "bytes_ddp_equivalent",
        "ddp_over_sent",
        "final_weights_agree",
        "wall_seconds",
    ):
        value = summary[key]
        print(f"  {key:26s} {value:.3f}" if isinstance(value, float) else f"  {key:26s} {value}")
