"""A peer of two ranks (`--nproc 2`, gloo) in a swarm with a peer of one: both end every
round with the same weights; killing its rank 1 stops that peer with an error, leaves no
process behind, and the swarm goes on."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import peer_processes, swarm_view, wait_for

pytestmark = pytest.mark.slow

TWO_RANKS = ["--nproc", "2", "--device", "cpu"]


def ranks_of(pid: int) -> list[int]:
    """The rank processes a peer process started (its children running shoal.peer.ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"shoal.peer.ranks" in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def test_a_two_rank_peer_trains_in_step_with_a_one_rank_peer(corpus, tmp_path):
    with peer_processes(corpus, tmp_path, 3, 4, [TWO_RANKS, []]) as (procs, _):
        for proc in procs:
            assert proc.wait(timeout=120) == 0, (tmp_path / "peer-0.log").read_text()[-3000:]
    reports = [json.loads((tmp_path / f"peer-{i}.json").read_text()) for i in (0, 1)]
    assert [len(r["rounds"]) for r in reports] == [3, 3]
    for a, b in zip(reports[0]["rounds"], reports[1]["rounds"], strict=True):
        assert a["weights_hash"] == b["weights_hash"] and sorted(a["applied"]) == [
            "peer-0",
            "peer-1",
        ]
    assert "2 ranks (DDP, gloo)" in (tmp_path / "peer-0.log").read_text()


def test_killing_rank_1_stops_its_peer_and_the_swarm_goes_on(corpus, tmp_path):
    rounds = 40
    with peer_processes(corpus, tmp_path, rounds, 20, [TWO_RANKS, []]) as (procs, urls):
        ranks = wait_for(lambda: ranks_of(procs[0].pid), 30, "peer-0's rank 1")
        wait_for(lambda: (view := swarm_view(urls[1])) and view["round"] >= 2, 90, "round 2 done")
        entry = next(p for p in swarm_view(urls[1])["peers"] if p["peer_id"] == "peer-0")
        assert entry["devices"] == "2 x cpu (DDP)"
        os.kill(ranks[0], signal.SIGKILL)
        killed_at = time.monotonic()
        code = procs[0].wait(timeout=60)
        log = (tmp_path / "peer-0.log").read_text()
        assert code != 0 and "rank" in log.splitlines()[-1], log[-2000:]
        assert not any(alive(pid) for pid in ranks)
        stopped_round = swarm_view(urls[1])["round"]
        wait_for(
            lambda: (view := swarm_view(urls[1])) and view["round"] >= stopped_round + 2,
            60,
            "peer-1 to go on alone",
        )
        assert time.monotonic() - killed_at < 90
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=30) == 0
