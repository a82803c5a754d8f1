"""Three peers train rounds over real sockets and agree bit for bit after every round, with
reduce-scatter (the default for dense codecs) and with the gather of whole contributions."""

import pytest
from conftest import run_async, start_swarm, stop_all, tiny_run, wait_until

from shoal.optim.outer import OuterConfig
from shoal.peer.reduce import shard_range


@pytest.mark.parametrize("exchange", ["auto", "gather"])
def test_three_peers_agree_every_round(corpus, exchange):
    async def scenario():
        # 1,024 elements a shard at least: the tiny model's 35k parameters make 3 shards
        run = tiny_run(outer=OuterConfig(codec="int8", exchange=exchange, shard_elements=1024))
        peers = await start_swarm(corpus, 3, max_rounds=3, run=run)
        try:
            await wait_until(
                lambda: all(p.finished.is_set() for p in peers), 90, "3 rounds on 3 peers"
            )
            for round_index in range(3):
                entries = [p.round_log[round_index] for p in peers]
                assert len({e["weights_hash"] for e in entries}) == 1, (
                    f"round {round_index + 1} hashes differ"
                )
                assert all(e["applied"] == ["peer-0", "peer-1", "peer-2"] for e in entries)
                assert not any(e["resynced"] for e in entries)
            assert all(p.outer_round == 3 for p in peers)
            assert peers[0].round_log[-1]["eval_loss"] < peers[0].engine.initial_eval_loss
            # contributions really crossed the sockets, at the codec's exact int8 size
            outer = peers[0].engine.outer
            numel = sum(t.numel() for t in outer.params.values())
            sent = peers[0].traffic.sent
            if exchange == "gather":
                payload_bytes = sum(
                    outer.codec.payload_nbytes(t.numel()) for t in outer.params.values()
                )
                # our whole contribution, served to 2 peers in each of 3 rounds
                assert 2 * 3 * payload_bytes < sent["contribution"]
                assert sent["contribution"] < 2 * 3 * (payload_bytes * 1.01 + 2048)
                assert sent["shard"] == sent["reduced"] == 0
            else:
                # in each of 3 rounds peer-0 serves two shards of its pseudo-gradient to their
                # owners and its mean of the third to both others (shards differ by <= 1
                # element, so which one it owns, rotating by round, does not matter here)
                size = [
                    outer.codec.payload_nbytes(b - a)
                    for a, b in (shard_range(numel, 3, i) for i in range(3))
                ]
                for kind, data_bytes in (("shard", size[1] + size[2]), ("reduced", 2 * size[0])):
                    assert 3 * data_bytes < sent[kind] < 3 * (data_bytes + 2 * 512), kind
                assert sent["contribution"] == 0
                assert peers[0].engine.sharded.fallbacks == 0
        finally:
            await stop_all(peers)

    run_async(scenario(), 120)
