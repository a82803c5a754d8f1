"""A peer that publishes NaN pseudo-gradients is left out by every honest peer, and the
honest peers' weights stay finite and identical."""

import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import peer_config, run_async, start_swarm, stop_all, tiny_run, wait_until

from shoal.compression import get_codec
from shoal.compression.base import _CRC_OFFSET, HEADER, MAGIC
from shoal.optim.outer import OuterConfig
from shoal.optim.registry import outer_config
from shoal.peer.node import Peer


def nan_payload(count: int) -> bytes:
    """A well-formed fp32 payload (right header, length and CRC) full of NaN."""
    codec = get_codec("fp32")
    body = np.full(count, np.nan, dtype="<f4").tobytes()
    prefix = HEADER.pack(MAGIC, codec.codec_id, codec.version, count, 0)[:_CRC_OFFSET]
    return prefix + struct.pack("<I", zlib.crc32(body, zlib.crc32(prefix))) + body


@pytest.mark.parametrize("exchange", ["auto", "gather"])
def test_nan_contributions_are_dropped(corpus, caplog, exchange):
    """With the gather the attacker's whole contribution is NaN; with reduce-scatter every
    shard it serves and the mean it owns are: the owners drop its shards, the others refuse
    its mean and reduce that shard themselves."""
    # 3 shards of the tiny model (1,024 elements at least each): the attacker owns one a round
    run = tiny_run(outer=OuterConfig(codec="fp32", exchange=exchange, shard_elements=1024))

    async def scenario():
        honest = await start_swarm(corpus, 2, max_rounds=3, run=run, min_peers=3)
        attacker = Peer(
            peer_config(
                corpus, "peer-2", bootstrap=honest[0].address, max_rounds=3, run=run, min_peers=3
            )
        )
        await attacker.start()
        # no await between start() and the patch: the training task has not run yet
        shapes = attacker.engine.outer.shapes
        attacker.engine.outer.contribution = lambda local: {
            n: nan_payload(int(np.prod(s))) for n, s in shapes.items()
        }
        attacker.engine.outer.decode_contribution = lambda payload: {
            n: torch.zeros(s) for n, s in shapes.items()
        }
        attacker.engine.sharded.encode = lambda piece: nan_payload(piece.numel())
        attacker.engine.sharded.decode = lambda data, count: torch.zeros(count)
        everyone = [*honest, attacker]
        try:
            await wait_until(lambda: all(p.finished.is_set() for p in everyone), 90, "3 rounds")
            for a, b in zip(honest[0].round_log, honest[1].round_log, strict=True):
                assert a["applied"] == b["applied"] == ["peer-0", "peer-1"]
                assert a["weights_hash"] == b["weights_hash"]
            assert all(torch.isfinite(t).all() for t in honest[0].engine.outer.params.values())
            refused = [r.getMessage() for r in caplog.records if "peer-2's" in r.getMessage()]
            assert len(refused) >= 2 and all("non-finite" in m for m in refused), refused
            if exchange == "gather":
                # the attacker's own set includes itself, but the intersection with the honest
                # peers' sets does not: it applied what they applied
                assert (
                    attacker.round_log[-1]["weights_hash"]
                    == honest[0].round_log[-1]["weights_hash"]
                )
            else:
                assert honest[0].engine.sharded.fallbacks == 3  # the attacker's shard, each round
        finally:
            await stop_all(everyone)

    caplog.set_level("WARNING", logger="shoal.peer")
    run_async(scenario(), 120)


def test_huge_sparse_contribution_is_clipped_to_the_median(corpus):
    """SparseLoCo over the network: a peer sending a valid top-k payload a million times
    larger than an honest one moves the honest peers' weights no further than the clipping
    bound allows, ‖Δθ‖ ≤ α·√n·median norm (each clipped contribution has norm ≤ median,
    and a per-index mean of them has norm ≤ the root of their summed squares)."""
    run = tiny_run(outer=outer_config("sparseloco"))

    async def scenario():
        honest = await start_swarm(corpus, 2, max_rounds=3, run=run, min_peers=3)
        attacker = Peer(
            peer_config(
                corpus, "peer-2", bootstrap=honest[0].address, max_rounds=3, run=run, min_peers=3
            )
        )
        await attacker.start()
        outer = attacker.engine.outer
        gen = torch.Generator().manual_seed(0)
        outer.contribution = lambda local: {
            n: outer.codec.encode(1e3 * torch.randn(s, generator=gen))
            for n, s in outer.shapes.items()
        }
        steps = []  # per round on peer-0: contribution norms, ‖Δθ‖
        watched = honest[0].engine.outer
        real_apply = watched.apply

        def apply(contributions):
            before = {n: t.clone() for n, t in watched.params.items()}
            real_apply(contributions)
            moved = (
                sum(float((watched.params[n] - before[n]).double().square().sum()) for n in before)
                ** 0.5
            )
            steps.append(([c.norm() for c in contributions], moved))

        watched.apply = apply
        everyone = [*honest, attacker]
        try:
            await wait_until(lambda: all(p.finished.is_set() for p in everyone), 90, "3 rounds")
            assert len(steps) == 3
            for a, b in zip(honest[0].round_log, honest[1].round_log, strict=True):
                assert (
                    a["applied"] == b["applied"] == ["peer-0", "peer-1", "peer-2"]
                )  # finite: not dropped
                assert a["weights_hash"] == b["weights_hash"]
            for norms, moved in steps:
                median = sorted(norms)[1]
                assert max(norms) > 1e4 * median  # the attacker's really is huge
                assert 0 < moved <= watched.config.lr * len(norms) ** 0.5 * median * (1 + 1e-5), (
                    norms,
                    moved,
                )
        finally:
            await stop_all(everyone)

    run_async(scenario(), 120)
