"""Peers that all stall at once (here: one blocked event loop shared by three in-process
peers) mark each other dead; probing dead peers makes them find each other again."""

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
            assert all(p.membership.live_others() == [] for p in peers)  # each sees the others dead
            await wait_until(
                lambda: all(len(p.membership.live_others()) == 2 for p in peers),
                15,
                "peers to find each other again",
            )
        finally:
            await stop_all(peers)

    run_async(scenario(), 60)
