"""NoLoCo over real sockets: every step each peer averages with one live partner, no round
barrier; the replicas' slow weights stay different but close, and the peer table and
dashboard API report each peer's distance to its last partner."""

import asyncio

from conftest import run_async, start_swarm, stop_all, tiny_run, wait_until

from shoal.optim.registry import outer_config
from shoal.peer.demo import fetch_json


def test_noloco_peers_step_with_one_partner_each(corpus):
    run = tiny_run(outer=outer_config("noloco"))

    async def scenario():
        peers = await start_swarm(corpus, 3, max_rounds=4, run=run)
        try:
            await wait_until(lambda: all(p.finished.is_set() for p in peers), 90, "4 NoLoCo steps")
            for peer in peers:
                assert peer.error is None
                assert [r["round"] for r in peer.round_log] == [1, 2, 3, 4]
                groups = [r["applied"] for r in peer.round_log]
                assert all(peer.peer_id in g and len(g) == 2 for g in groups), (
                    groups
                )  # always found its partner
                distances = [r["partner_distance"] for r in peer.round_log]
                # all start at θ₀; two peers that picked each other stay equal until they part
                assert distances[0] == 0 and all(0 <= d < 0.05 for d in distances), distances
                assert peer.round_log[-1]["eval_loss"] < peer.engine.initial_eval_loss
            # three peers cannot all pair mutually in step 1, so by step 2 some pair differs
            assert max(r["partner_distance"] for p in peers for r in p.round_log[1:]) > 0
            hashes = {p.round_log[-1]["weights_hash"] for p in peers}
            assert len(hashes) > 1  # no all-reduce: replicas are not forced to agree
            view = await asyncio.to_thread(fetch_json, peers[0].address + "/api/swarm")
            reported = {p["peer_id"]: p for p in view["peers"]}
            assert reported["peer-0"]["partner"] in ("peer-1", "peer-2")
            assert (
                reported["peer-0"]["partner_distance"] == peers[0].round_log[-1]["partner_distance"]
            )
        finally:
            await stop_all(peers)

    run_async(scenario(), 150)
