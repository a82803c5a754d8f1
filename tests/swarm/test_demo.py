"""`shoal demo` end to end (tiny model), and Ctrl-C leaves no process behind."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts peer processes; run by the default command

DEMO = [sys.executable, "-m", "shoal.peer.cli", "demo", "--model", "tiny", "--inner-steps", "20"]


def children_of(workdir: str) -> list[int]:
    """Peer processes whose command line points into the demo's work folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if workdir in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.timeout(180)
def test_demo_writes_a_summary(corpus, tmp_path):
    summary_path = tmp_path / "s.json"
    done = subprocess.run(
        [*DEMO, "--peers", "2", "--rounds", "3", "--data", corpus, "--summary", str(summary_path)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dashboard: http://127.0.0.1:" in done.stdout and "round 3/3" in done.stdout
    summary = json.loads(summary_path.read_text())
    for key in (
        "peers",
        "rounds",
        "eval_loss_first",
        "eval_loss_last",
        "bytes_sent_total",
        "bytes_ddp_equivalent",
        "wall_seconds",
    ):
        assert key in summary, key
    assert summary["peers"] == 2 and summary["rounds"] == 3 and summary["final_weights_agree"]
    assert summary["eval_loss_last"] < summary["eval_loss_initial"]
    assert summary["bytes_ddp_equivalent"] > summary["bytes_sent_total"] > 0
    workdir = re.search(r"logs in (\S+)", done.stdout).group(1)
    assert children_of(workdir) == []


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_peer(corpus):
    # Ctrl-C at a terminal: SIGINT at its default, even where this suite was started in the
    # background (a non-interactive shell's `&` ignores SIGINT, and children inherit that)
    demo = subprocess.Popen(
        [*DEMO, "--peers", "2", "--rounds", "1000", "--data", corpus],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        workdir = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if m := re.search(r"logs in (\S+)", line):
                workdir = m.group(1)
            if re.match(r"round \d+/", line):
                break
        assert workdir and len(children_of(workdir)) == 2
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 130
        assert children_of(workdir) == []
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in children_of(workdir) if workdir else []:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(180)
def test_demo_runs_from_the_issues_toml_file(corpus, tmp_path):
    """`shoal demo --config FILE` with model, peers, rounds and inner_steps (and a small batch,
    so that it is quick on 2 cores); flags given beside it override the file."""
    config = tmp_path / "run.toml"
    config.write_text(
        'model = "tiny"\npeers = 3\nrounds = 3\ninner_steps = 5\nbatch_size = 4\nseq_len = 32\n'
        f'data = "{corpus}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "shoal.peer.cli", "demo", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shoal demo: 3 peers, 3 rounds of tiny" in done.stdout and "round 3/3" in done.stdout
    assert "\nsummary\n" in done.stdout and "final_weights_agree        True" in done.stdout


@pytest.mark.timeout(240)
def test_demo_runs_from_a_toml_file_with_a_pipeline_replica(corpus, tmp_path):
    """The issue's file (model, peers, rounds, inner_steps), plus --stages: besides the full
    replicas the demo starts one pipeline replica, and every peer ends in step."""
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny-deep"\npeers = 2\nrounds = 3\ninner_steps = 5\nstages = 3\n'
        f'[data]\ndata = "{corpus}"\n[inner]\nbatch_size = 4\nseq_len = 32\n'
    )
    summary_path = tmp_path / "s.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal.peer.cli",
            "demo",
            "--config",
            str(config),
            "--summary",
            str(summary_path),
        ],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 peers and a 3-stage pipeline replica, 3 rounds of tiny-deep" in done.stdout
    summary = json.loads(summary_path.read_text())
    assert summary["peers"] == 5 and summary["stages"] == 3 and summary["rounds"] == 3
    assert summary["inner_steps"] == 5 and summary["final_weights_agree"]


@pytest.mark.timeout(120)
def test_a_peer_that_fails_at_start_up_is_reported_by_its_own_error(tmp_path):
    done = subprocess.run(
        [*DEMO, "--peers", "2", "--rounds", "1", "--data", str(tmp_path / "no-such-corpus")],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 1
    assert "peer-0 exited during start-up:" in done.stderr and "no-such-corpus" in done.stderr, (
        done.stderr
    )
    assert "Traceback" not in done.stderr
