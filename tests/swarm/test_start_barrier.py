"""The --min-peers start barrier is swarm-wide: round 0 starts when enough peers are ready
to train, not when enough have joined (a joined peer may still be building its model), and
a peer that joins a swarm already training does not wait for --min-peers again."""

import asyncio

from conftest import peer_config, run_async, start_swarm, stop_all, wait_until

from shoal.peer.node import Peer


def test_round_zero_waits_for_ready_peers_not_for_joins(corpus):
    async def scenario():
        kw = dict(min_peers=3, max_rounds=2)
        first = Peer(peer_config(corpus, "peer-0", **kw))
        await first.start()
        second = Peer(peer_config(corpus, "peer-1", bootstrap=first.address, **kw))
        await second.start()
        # joined and gossiping, but never at the barrier: a peer still building its model
        idle = Peer(peer_config(corpus, "idle", bootstrap=first.address, **kw))
        await idle.start(train=False)
        peers = [first, second, idle]
        try:
            await wait_until(
                lambda: (
                    all(len(p.membership.live_others()) == 2 for p in peers)
                    and first.membership.peers["peer-1"].phase == "ready"
                ),
                10,
                "3 peers alive everywhere, 2 of them ready",
            )
            await asyncio.sleep(2.0)  # 4 heartbeats; a tiny round's inner phase takes ~30 ms
            for p in (first, second):  # 3 joined, 2 ready: nobody trains yet
                assert p.membership.me.phase == "ready" and p.store.contributions == {}
            await idle.stop()
            await wait_until(
                lambda: (
                    not first.membership.is_alive("idle") and not second.membership.is_alive("idle")
                ),
                10,
                "the idle peer to be dead",
            )
            third = Peer(peer_config(corpus, "peer-2", bootstrap=first.address, **kw))
            peers.append(third)
            await third.start()
            everyone = [first, second, third]
            await wait_until(lambda: all(p.finished.is_set() for p in everyone), 60, "2 rounds")
            for p in everyone:  # all three from round 0 on: nobody started alone
                assert p.error is None, (p.peer_id, p.error)
                applied = [sorted(r["applied"]) for r in p.round_log]
                assert applied == [["peer-0", "peer-1", "peer-2"]] * 2, (p.peer_id, applied)
        finally:
            await stop_all(peers)

    run_async(scenario(), 90)


def test_a_peer_joining_a_training_swarm_does_not_wait_for_min_peers(corpus):
    async def scenario():
        swarm = await start_swarm(corpus, 2, max_rounds=2)
        # a live peer that never contributes holds round 0 open for the gather deadline
        idle = Peer(peer_config(corpus, "idle", bootstrap=swarm[0].address))
        await idle.start(train=False)
        peers = [*swarm, idle]
        try:
            await wait_until(
                lambda: all(p.membership.me.phase == "training" for p in swarm),
                10,
                "the swarm to train",
            )
            assert all(p.outer_round == 0 for p in swarm)
            late = Peer(
                peer_config(corpus, "late", bootstrap=swarm[0].address, min_peers=5, max_rounds=2)
            )
            peers.append(late)
            await late.start()
            # 4 live peers, --min-peers 5: the old barrier waited here for 10 minutes
            await wait_until(lambda: late.membership.me.phase == "training", 5, "late to start")
            assert late.engine.round == 0 and all(p.outer_round == 0 for p in swarm)
            await idle.stop()
            everyone = [*swarm, late]
            await wait_until(lambda: all(p.finished.is_set() for p in everyone), 60, "2 rounds")
            assert all(p.error is None for p in everyone)
            assert "late" in swarm[0].round_log[-1]["applied"]
        finally:
            await stop_all(peers)

    run_async(scenario(), 90)
