"""Peers that all stall at once (here: one blocked event loop shared by three in-process
peers): silence alone is no evidence under SWIM, so nobody is held dead; and peers that do
hold each other dead (as failed probes leave them) find each other again by probing."""

import time

from conftest import peer_config, run_async, stop_all, wait_until

from shoal.peer.node import Peer


def test_peers_that_all_stalled_find_each_other_again(corpus):
    async def scenario():
        first = Peer(peer_config(corpus, "peer-0"))
        await first.start(train=False)
        peers = [first]
        for i in (1, 2):
            peer = Peer(peer_config(corpus, f"peer-{i}", bootstrap=first.address))
            await peer.start(train=False)
            peers.append(peer)
        try:
            await wait_until(
                lambda: all(len(p.membership.live_others()) == 2 for p in peers),
                10,
                "3 peers to see each other",
            )
            dead_after = peers[0].config.protocol.dead_after_s
            time.sleep(dead_after + 1.0)  # noqa: ASYNC251 - on purpose: every peer's heartbeats stop at once
            # nobody probed anybody meanwhile: nobody suspects anybody
            assert all(len(p.membership.live_others()) == 2 for p in peers)
            for p in peers:  # as if every probe had failed during the stall
                for other in peers:
                    p.membership.declare_dead(other.peer_id)
            assert all(p.membership.live_others() == [] for p in peers)
            await wait_until(
                lambda: all(len(p.membership.live_others()) == 2 for p in peers),
                15,
                "peers to find each other again",
            )
        finally:
            await stop_all(peers)

    run_async(scenario(), 60)
