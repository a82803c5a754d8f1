"""A replica behind a real NAT (issue 22, item 4): network namespaces, the peer behind a
router namespace with nftables masquerade and no inbound forwarding (`scripts/wan/netns.py
--nat`). Nothing outside can connect to it; it joins peer 0 with only `--bootstrap`, the
dial-back fails, it trains through relays, its contributions are applied by the others and
it ends with their weights hash. Needs root, `ip` and `nft` (skipped otherwise)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WAN = Path(__file__).resolve().parents[2] / "scripts" / "wan"
PREFIX = "shoalnat"

def namespaces_work() -> bool:
    """Root, `ip` and `nft`, and a namespace can really be made (a container may refuse)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return False
    name = f"{PREFIX}-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return made


pytestmark = pytest.mark.skipif(
    not namespaces_work(),
    reason="network namespaces and NAT need root, iproute2's ip, nftables' nft "
    "(apt-get install nftables) and a kernel that lets us make namespaces",
)


def load(name: str):
    if name not in sys.modules:
        sys.path.insert(0, str(WAN))  # swarm.py imports netns as a sibling
        spec = importlib.util.spec_from_file_location(name, WAN / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_nat_namespace_takes_no_inbound_connection():
    netns = load("netns")
    with netns.Wan(2, ["1gbit"], PREFIX, nat=[1]) as wan:
        report = wan.check_nat(1)
    assert report == {
        "inbound_direct": False,
        "inbound_router": False,
        "outbound": True,
        "seen_as": wan.address(1),  # masqueraded as its router
    }


def test_a_replica_behind_nat_joins_and_trains(corpus, tmp_path):
    swarm = load("swarm")
    rounds = 3
    flags = [
        *("--model", "tiny", "--inner-steps", "4", "--batch-size", "4", "--seq-len", "32"),
        *("--inner-lr", "0.003", "--data", corpus, "--threads", "1", "--eval-batches", "2"),
        *("--heartbeat-interval", "0.5", "--suspect-after", "1.5", "--dead-after", "3"),
        *("--min-gather-timeout", "8", "--agree-timeout", "3", "--linger", "5"),
    ]
    reports = swarm.run_swarm(
        3, ["1gbit"], rounds, tmp_path, flags, timeout_s=150, prefix=PREFIX, nat=[2]
    )
    log = (tmp_path / "peer-2.log").read_text()
    assert "the dial-back failed" in log and "behind NAT: reached at http://10.77.0." in log
    for report in reports[:2]:
        applied = [entry["applied"] for entry in report["rounds"]]
        assert len(applied) == rounds and all("peer-2" in a for a in applied), applied
    assert sum(r["bytes_received_by_kind"].get("relay", 0) for r in reports[:2]) > 0
    hashes = {r["peer_id"]: r["rounds"][-1]["weights_hash"] for r in reports}
    assert len(set(hashes.values())) == 1, hashes


def test_a_pipeline_stage_behind_nat_serves_its_hops(corpus, tmp_path):
    """The same for a stage peer: stage 1's only peer sits behind the NAT, so every hop of
    the driver (stage 0) reaches it through the long polls it opened to its relays."""
    swarm = load("swarm")
    rounds = 2
    flags = [
        *("--model", "tiny", "--inner-steps", "4", "--batch-size", "4", "--seq-len", "32"),
        *("--inner-lr", "0.003", "--data", corpus, "--threads", "1", "--eval-batches", "2"),
        *("--heartbeat-interval", "0.5", "--suspect-after", "1.5", "--dead-after", "3"),
        *("--min-gather-timeout", "8", "--agree-timeout", "3", "--linger", "5"),
        *("--stages", "2", "--microbatch-size", "2"),
    ]
    peer_flags = [
        ["--role", "replica"],
        ["--role", "stage", "--stage", "0"],
        ["--role", "stage", "--stage", "1"],
    ]
    reports = swarm.run_swarm(
        3,
        ["1gbit"],
        rounds,
        tmp_path,
        flags,
        timeout_s=150,
        prefix=PREFIX,
        peer_flags=peer_flags,
        nat=[2],
    )
    log = (tmp_path / "peer-2.log").read_text()
    assert "the dial-back failed" in log and "behind NAT: reached at http://10.77.0." in log
    nat = reports[2]
    assert nat["bytes_received_by_kind"].get("forward", 0) > 0  # the driver's hops reached it
    for report in reports:
        applied = [entry["applied"] for entry in report["rounds"]]
        assert len(applied) == rounds and all("peer-2" in a for a in applied), applied
