"""Three peers train rounds over real sockets and agree bit for bit after every round."""

from conftest import run_async, start_swarm, stop_all, wait_until


def test_three_peers_agree_every_round(corpus):
    async def scenario():
        peers = await start_swarm(corpus, 3, max_rounds=3)
        try:
            await wait_until(lambda: all(p.finished.is_set() for p in peers), 90, "3 rounds on 3 peers")
            for round_index in range(3):
                entries = [p.round_log[round_index] for p in peers]
                assert len({e["weights_hash"] for e in entries}) == 1, f"round {round_index + 1} hashes differ"
                assert all(e["applied"] == ["peer-0", "peer-1", "peer-2"] for e in entries)
                assert not any(e["resynced"] for e in entries)
            assert all(p.outer_round == 3 for p in peers)
            assert peers[0].round_log[-1]["eval_loss"] < peers[0].initial_eval_loss
            # contributions really crossed the sockets, int8-sized
            params = sum(t.numel() for t in peers[0].outer.params.values())
            contribution_bytes = peers[0].traffic.sent["contribution"]
            assert 2 * 3 * params * 0.9 < contribution_bytes < 2 * 3 * params * 1.1  # 2 fetchers x 3 rounds x ~1 byte/param
        finally:
            await stop_all(peers)

    run_async(scenario(), 120)
