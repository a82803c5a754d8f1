"""Three peers train rounds over real sockets and agree bit for bit after every round."""

from conftest import run_async, start_swarm, stop_all, wait_until


def test_three_peers_agree_every_round(corpus):
    async def scenario():
        peers = await start_swarm(corpus, 3, max_rounds=3)
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
            codec = peers[0].engine.outer.codec
            payload_bytes = sum(
                codec.payload_nbytes(t.numel()) for t in peers[0].engine.outer.params.values()
            )
            fp32_bytes = 4 * sum(t.numel() for t in peers[0].engine.outer.params.values())
            sent = peers[0].traffic.sent["contribution"]  # served to 2 peers in each of 3 rounds
            assert 2 * 3 * payload_bytes < sent < 2 * 3 * (payload_bytes * 1.01 + 2048)
            assert payload_bytes < 0.5 * fp32_bytes
        finally:
            await stop_all(peers)

    run_async(scenario(), 120)
