"""A fourth peer joins mid-run, downloads the outer state in chunks and ends in step."""

import asyncio
from dataclasses import replace

import pytest
import torch
from conftest import (
    FAST_PROTOCOL,
    peer_config,
    run_async,
    start_swarm,
    stop_all,
    tiny_run,
    wait_until,
)

from shoal.peer.errors import ShoalError
from shoal.peer.node import Peer


def test_fourth_peer_joins_mid_run_and_converges(corpus):
    async def scenario():
        rounds = 5
        # small state chunks so the download really is chunked
        protocol = replace(FAST_PROTOCOL, state_chunk_bytes=16 * 1024)
        peers = await start_swarm(corpus, 3, max_rounds=rounds, protocol=protocol)
        joiner = None
        try:
            # the table's round, not `outer_round`: a peer publishes a round's state only after
            # verifying it, and `outer_round` moves on when the outer step is applied, before
            await wait_until(
                lambda: all(p.membership.me.round >= 2 for p in peers), 60, "round 2 published"
            )
            joiner = Peer(
                peer_config(
                    corpus,
                    "peer-3",
                    bootstrap=peers[1].address,
                    max_rounds=rounds,
                    protocol=protocol,
                )
            )
            await joiner.start()
            join_round = joiner.outer_round
            assert join_round >= 2, (
                "the joiner must start from the swarm's current round, not from scratch"
            )
            assert joiner.traffic.received["chunk"] > 16 * 1024  # several chunks arrived
            everyone = [*peers, joiner]
            await wait_until(
                lambda: all(p.finished.is_set() for p in everyone), 90, "all peers finish"
            )
            final = {p.peer_id: p.round_log[-1]["weights_hash"] for p in everyone}
            assert len(set(final.values())) == 1, final
            assert all(p.outer_round == rounds for p in everyone)
            # the joiner contributed to at least the last round
            assert "peer-3" in peers[0].round_log[-1]["applied"]
        finally:
            await stop_all(peers + ([joiner] if joiner else []))

    run_async(scenario(), 150)


def test_a_state_larger_than_a_write_step_streams_and_verifies(corpus):
    """`small`'s state (weights and momentum, 7 MB) in 4 MiB chunks: each answer is
    written a megabyte at a time (bodies.STEP_BYTES) and read back intact."""
    from shoal.peer.bodies import STEP_BYTES
    from shoal.peer.statesync import download_state
    from shoal.train import PRESETS

    async def scenario():
        run = tiny_run(model_preset="small", model=PRESETS["small"].to_dict())
        host = Peer(peer_config(corpus, "host", run=run))
        await host.start(train=False)
        reader = Peer(peer_config(corpus, "reader", run=run, bootstrap=host.address))
        await reader.start(train=False)
        try:
            assert host.config.protocol.state_chunk_bytes > STEP_BYTES
            round_id, tensors, _ = await download_state(
                reader.client, [host.membership.me], reader.engine.state_shapes
            )
            ours = host.publisher.latest.tensors
            assert round_id == 0 and all(torch.equal(tensors[n], ours[n]) for n in tensors)
            assert reader.traffic.received["chunk"] > 2 * STEP_BYTES
        finally:
            await stop_all([host, reader])

    run_async(scenario(), 120)


def test_a_download_waits_for_the_round_it_asks_for(corpus):
    """A resync asks for the state the hash vote was about (`min_round`): sources still at
    the round before are waited for, within `min_round_wait_s`, and no attempt is spent."""
    from shoal.peer.publisher import Snapshot
    from shoal.peer.statesync import download_state

    async def scenario():
        host = Peer(peer_config(corpus, "host"))
        await host.start(train=False)
        reader = Peer(peer_config(corpus, "reader", bootstrap=host.address))
        await reader.start(train=False)
        try:
            shapes, sources = reader.engine.state_shapes, [host.membership.me]
            with pytest.raises(ShoalError, match="not yet 1"):
                await download_state(reader.client, sources, shapes, min_round=1, attempts=1)
            latest = host.publisher.latest
            moved = {n: t + 1.0 for n, t in latest.tensors.items()}

            async def next_round():
                await asyncio.sleep(1.0)
                host.publisher.publish(Snapshot(1, moved, "h"))

            later = asyncio.create_task(next_round())
            round_id, tensors, _ = await download_state(
                reader.client, sources, shapes, min_round=1, min_round_wait_s=10, attempts=1
            )
            await later
            assert round_id == 1 and all(torch.equal(tensors[n], moved[n]) for n in tensors)
        finally:
            await stop_all([host, reader])

    run_async(scenario(), 60)
