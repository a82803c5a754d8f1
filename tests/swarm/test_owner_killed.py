"""A shard owner SIGKILLed mid-round (reduce-scatter): after the round's set is agreed and
while it owns a shard it has not yet served, its process is killed. The others reduce that
shard themselves from the members' shards, finish the round within the gather deadline,
end bit-identical, and train on without it. Peers are separate processes."""

import json
import signal
import time

import pytest
from conftest import peer_url, spawn_peer, wait_for

pytestmark = pytest.mark.slow  # starts peer processes; run by the default command

# The victim: the real CLI, but its own shard's reduce in round 1 announces itself on stdout
# and hangs, so the test kills it at exactly that point (a test-only patch, not a hook).
VICTIM = """
import asyncio, sys
from shoal.peer import reduce
from shoal.peer.cli import main

real = reduce.ShardedMean._reduce

async def hanging(self, round_id, layout, index, deadline):
    if round_id == 1 and layout.owners[index] == self.me:
        print("OWNER-REDUCING", flush=True)
        await asyncio.sleep(3600)
    return await real(self, round_id, layout, index, deadline)

reduce.ShardedMean._reduce = hanging
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(240)
def test_sigkilled_shard_owner_costs_at_most_the_gather_deadline(corpus, tmp_path):
    rounds, gather_s = 4, 10.0
    flags = ["--min-peers", "3", "--gather-timeout", str(gather_s)]
    procs = []
    try:
        procs.append(spawn_peer(corpus, tmp_path, 0, rounds, 30, flags))
        first = peer_url(tmp_path, 0, procs[0])
        # the tiny model (35k parameters) is one shard (65,536 elements at least), owned in
        # round r by the (r mod 3)-th member in sorted order: peer-1 in round 1
        launcher = ("-c", VICTIM)
        procs.append(spawn_peer(corpus, tmp_path, 1, rounds, 30, flags, "tiny", first, launcher))
        procs.append(spawn_peer(corpus, tmp_path, 2, rounds, 30, flags, bootstrap=first))
        victim_log = tmp_path / "peer-1.log"
        wait_for(lambda: "OWNER-REDUCING" in victim_log.read_text(), 150, "peer-1 owning")
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        procs[1].wait(timeout=10)
        survivors = (0, 2)
        for i in survivors:
            assert procs[i].wait(timeout=150) == 0
        reports = [json.loads((tmp_path / f"peer-{i}.json").read_text()) for i in survivors]
        for a, b in zip(reports[0]["rounds"], reports[1]["rounds"], strict=True):
            assert a["weights_hash"] == b["weights_hash"]
        for report in reports:
            log = report["rounds"]
            assert [r["round"] for r in log] == list(range(1, rounds + 1))
            # round 1: peer-1 was agreed on, but the shard was reduced without it
            assert [r["applied"] for r in log] == [["peer-0", "peer-1", "peer-2"]] + [
                ["peer-0", "peer-2"]
            ] * (rounds - 1)
        for i in survivors:
            text = (tmp_path / f"peer-{i}.log").read_text()
            assert "shard 0 of 1 not delivered by peer-1; reducing it here" in text
        # the round the owner died in ended at most the gather deadline (plus the time to
        # reduce the shard: milliseconds) after the kill
        round_1_end = reports[0]["rounds"][1]["time"]
        assert round_1_end - killed_at < gather_s + 3.0, round_1_end - killed_at
        print(f"round 1 ended {round_1_end - killed_at:.1f} s after the owner was killed")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
