"""Peers that all stall at once (here: one blocked event loop shared by three in-process
peers): silence alone is no evidence under SWIM, so nobody is held dead; and peers that do
hold each other dead (as failed probes leave them) find each other again by probing. A
false suspicion is refuted by its target before it turns into a death."""

import asyncio
import time

from conftest import run_async, start_swarm, stop_all, wait_until


def all_see_each_other(peers) -> bool:
    return all(len(p.membership.live_others()) == len(peers) - 1 for p in peers)


def test_peers_that_all_stalled_find_each_other_again(corpus):
    async def scenario():
        peers = await start_swarm(corpus, 3, train=False)
        try:
            await wait_until(
                lambda: all_see_each_other(peers),
                10,
                "3 peers to see each other",
            )
            dead_after = peers[0].config.protocol.dead_after_s
            time.sleep(dead_after + 1.0)  # noqa: ASYNC251 - on purpose: every peer's heartbeats stop at once
            # nobody probed anybody meanwhile: nobody suspects anybody
            assert all_see_each_other(peers)
            for p in peers:  # as if every probe had failed during the stall
                for other in peers:
                    p.membership.declare_dead(other.peer_id)
            assert all(p.membership.live_others() == [] for p in peers)
            await wait_until(
                lambda: all_see_each_other(peers),
                15,
                "peers to find each other again",
            )
        finally:
            await stop_all(peers)

    run_async(scenario(), 60)


def test_a_false_suspicion_is_refuted_before_it_becomes_a_death(corpus):
    """SWIM over real sockets: peer-0 suspects a live peer and spreads it; the suspect hears
    of it, refutes with a larger heartbeat, and no peer ever holds it dead."""

    async def scenario():
        peers = await start_swarm(corpus, 3, train=False)
        try:
            await wait_until(
                lambda: all_see_each_other(peers),
                10,
                "3 peers to see each other",
            )
            accuser, suspect = peers[0].agent, peers[2]
            assert accuser.membership.suspect("peer-2")
            accuser.gossip.spread("peer-2", "suspect")
            accuser.spread_fresh(also=accuser.membership.peers["peer-2"])
            seen_dead = False
            deadline = time.monotonic() + 2 * peers[0].config.protocol.dead_after_s
            while time.monotonic() < deadline:
                seen_dead |= any(p.membership.status("peer-2") == "dead" for p in peers[:2])
                await asyncio.sleep(0.05)
            assert not seen_dead
            assert suspect.membership.me.heartbeat >= 1  # it refuted
            assert all(p.membership.status("peer-2") == "alive" for p in peers[:2])
            assert all(p.membership.peers["peer-2"].heartbeat >= 1 for p in peers[:2])
        finally:
            await stop_all(peers)

    run_async(scenario(), 60)
