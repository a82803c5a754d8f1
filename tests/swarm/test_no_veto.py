"""A key-holding peer attacks the round protocol over real sockets: it publishes empty sets
(under the old intersection rule that emptied every round), or serves a wrong outer state
that claims a newer round to a peer that resyncs. Training goes on, the honest peers apply
the honest contributions and end bit-identical, and the dashboard names the offender."""

import torch
from conftest import peer_config, run_async, start_swarm, stop_all, wait_until

from shoal.peer.node import Peer
from shoal.peer.publisher import Snapshot
from shoal.peer.roundstore import RoundStore

HONEST = ["peer-0", "peer-1", "peer-2"]


async def with_attacker(corpus, rounds: int) -> tuple[list[Peer], Peer]:
    honest = await start_swarm(corpus, 3, max_rounds=rounds, min_peers=4)
    attacker = Peer(
        peer_config(corpus, "peer-3", bootstrap=honest[0].address, max_rounds=rounds, min_peers=4)
    )
    await attacker.start()
    return honest, attacker


def test_an_empty_set_vetoes_nothing_and_the_offender_is_named(corpus):
    async def scenario():
        honest, attacker = await with_attacker(corpus, 3)
        store = attacker.store  # every set it publishes is empty
        store.put_set = lambda round_id, ids: RoundStore.put_set(store, round_id, [])
        everyone = [*honest, attacker]
        try:
            await wait_until(lambda: all(p.finished.is_set() for p in honest), 90, "3 rounds")
            logs = [p.round_log for p in honest]
            for entries in zip(*logs, strict=True):
                assert all(e["applied"] == HONEST for e in entries)  # not emptied
                assert len({e["weights_hash"] for e in entries}) == 1
            assert honest[0].round_log[-1]["eval_loss"] < honest[0].engine.initial_eval_loss
            view = honest[0].swarm_snapshot()
            named = {p["peer_id"]: p["left_out"] for p in view["peers"]}
            assert named["peer-3"] and "holds 0 of the 4" in named["peer-3"]
            assert not any(named[p] for p in HONEST)
            from shoal.peer.dashboard import render_html

            assert "left out: round" in render_html(view)
        finally:
            await stop_all(everyone)

    run_async(scenario(), 120)


def test_a_resync_refuses_a_state_that_is_not_the_majoritys(corpus, caplog):
    async def scenario():
        honest, attacker = await with_attacker(corpus, 4)
        publisher = attacker.publisher  # serves perturbed weights, claiming a newer round
        real_publish = publisher.publish

        def publish_forged(snapshot):
            forged = {n: t + 1.0 for n, t in snapshot.tensors.items()}
            real_publish(Snapshot(snapshot.round_id + 5, forged, snapshot.weights_hash))

        publisher.publish = publish_forged
        outer = honest[2].engine.outer  # peer-2 drifts once, in round 1, and must resync
        real_apply = outer.apply_mean

        def drifting(mean):
            real_apply(mean)
            if honest[2].engine.round == 1:
                next(iter(outer.params.values())).add_(1e-3)

        outer.apply_mean = drifting
        everyone = [*honest, attacker]
        try:
            await wait_until(lambda: all(p.finished.is_set() for p in everyone), 100, "4 rounds")
            assert [e["resynced"] for e in honest[2].round_log] == [False, True, False, False]
            for entries in zip(*(p.round_log for p in everyone), strict=True):
                assert len({e["weights_hash"] for e in entries}) == 1
            refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
            assert any("from peer-3 refused" in m for m in refused), refused
            assert all(torch.isfinite(t).all() for t in outer.params.values())
        finally:
            await stop_all(everyone)

    caplog.set_level("WARNING", logger="shoal.peer")
    run_async(scenario(), 150)
