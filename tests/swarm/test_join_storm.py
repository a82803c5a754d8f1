"""Join storms: a state download takes its chunks from every peer that serves the same
blob, so joiners arriving together spread over the swarm; a source that is down costs
nothing but its share of retries."""

import asyncio
from dataclasses import replace

import pytest
import torch
from conftest import FAST_PROTOCOL, peer_config, run_async, stop_all

from shoal.peer.membership import PeerInfo
from shoal.peer.node import Peer
from shoal.peer.statesync import download_state

pytestmark = pytest.mark.slow


def test_chunks_come_from_every_holder(corpus):
    protocol = replace(FAST_PROTOCOL, state_chunk_bytes=4 * 1024)  # tiny's state: ~30 chunks

    async def scenario():
        first = Peer(peer_config(corpus, "peer-0", protocol=protocol))
        await first.start(train=False)
        peers = [first]
        try:
            for i in (1, 2):
                peers.append(
                    Peer(
                        peer_config(corpus, f"peer-{i}", bootstrap=first.address, protocol=protocol)
                    )
                )
                await peers[-1].start(train=False)
            holders = [p.agent.me for p in peers]
            down = PeerInfo("peer-down", "http://127.0.0.1:1")
            shapes = peers[0].engine.state_shapes
            joiners = [
                download_state(peers[i % 3].client, [down, *holders], shapes) for i in range(4)
            ]
            results = await asyncio.gather(*joiners)
            served = [p.traffic.sent["chunk"] for p in peers]
            return results, served, peers[0].engine.outer.state_tensors()
        finally:
            await stop_all(peers)

    results, served, expected = run_async(scenario(), 90)
    assert all(count > 0 for count in served), served  # every holder served chunks
    assert max(served) < 3 * min(served)  # and about as many as the others
    for round_id, tensors, _ in results:
        assert round_id == 0
        assert all(torch.equal(tensors[name], expected[name]) for name in expected)
