"""Wrong keys, malformed and oversized bodies, mismatched configs: clear 4xx, no change."""

import os
from dataclasses import replace

import aiohttp
import msgpack
import pytest
from conftest import FAST_PROTOCOL, peer_config, run_async, tiny_run

from shoal.optim.outer import OuterConfig
from shoal.peer.errors import ConfigMismatch
from shoal.peer.node import Peer
from shoal.peer.wire import WireCodec
from shoal.train import PRESETS


def state_of(peer: Peer):
    return (
        sorted(peer.membership.peers),
        peer.engine.outer.weights_hash(),
        peer.outer_round,
        dict(peer.store.contributions),
    )


def test_bad_requests_get_4xx_and_change_nothing(corpus):
    async def scenario():
        protocol = replace(FAST_PROTOCOL, max_request_bytes=64 * 1024)
        peer = Peer(peer_config(corpus, "guarded", swarm_key="right-key", protocol=protocol))
        await peer.start(train=False)
        try:
            before = state_of(peer)
            url = peer.address + "/gossip"
            entry = {"peers": [{"peer_id": "intruder", "address": "http://127.0.0.1:9"}]}
            async with aiohttp.ClientSession() as session:

                async def post(codec: WireCodec, payload=None, raw: bytes | None = None):
                    body, headers = codec.encode("POST", "/gossip", payload or entry)
                    if raw is not None:  # sign the raw bytes as they are
                        body = raw
                        headers.update(codec.seal("POST", "/gossip", headers, raw))
                    async with session.post(url, data=body, headers=headers) as resp:
                        return resp.status, await resp.text()

                swarm = peer.wire.swarm_id
                wrong_key = WireCodec("x", swarm, "wrong-key", max_body_bytes=1 << 20)
                no_key = WireCodec("x", swarm, None, max_body_bytes=1 << 20)
                right_key = WireCodec("x", swarm, "right-key", max_body_bytes=1 << 20)
                other_swarm = WireCodec("x", "other", "right-key", max_body_bytes=1 << 20)
                status, text = await post(wrong_key)
                assert status == 401 and "HMAC" in text
                assert (await post(no_key))[0] == 401
                assert (await post(other_swarm))[0] == 401
                status, text = await post(right_key, raw=b"\xc1\xc1 not msgpack")
                assert status == 400 and "msgpack" in text
                assert (await post(right_key, raw=msgpack.packb({"peers": [{"peer_id": 5}]})))[
                    0
                ] == 400
                status, _ = await post(
                    right_key, payload={"peers": [], "pad": os.urandom(128 * 1024)}
                )
                assert status == 413
                status, text = await post(
                    right_key, payload={"peers": [], "pad": b"\0" * (1 << 20)}
                )  # zstd bomb
                assert status in (400, 413) and "exceeds" in text
                async with session.post(url, data=b"\0" * (200 * 1024)) as resp:
                    assert resp.status == 413
                async with session.post(peer.address + "/round/contribution", data=b"junk") as resp:
                    assert resp.status in (400, 401)
            assert state_of(peer) == before
        finally:
            await peer.stop()

    run_async(scenario(), 60)


@pytest.mark.parametrize(
    "mismatch",
    [
        dict(outer=OuterConfig(codec="fp32")),
        dict(inner_steps=7),
        dict(model_preset="small", model=PRESETS["small"].to_dict()),
    ],
)
def test_mismatched_joiner_is_refused(corpus, mismatch):
    async def scenario():
        host = Peer(peer_config(corpus, "host"))
        await host.start(train=False)
        try:
            joiner = Peer(
                peer_config(corpus, "odd", bootstrap=host.address, run=tiny_run(**mismatch))
            )
            with pytest.raises(ConfigMismatch, match="differs"):
                try:
                    await joiner.start()
                finally:
                    await joiner.stop()
            assert "odd" not in host.membership.peers
        finally:
            await host.stop()

    run_async(scenario(), 60)
