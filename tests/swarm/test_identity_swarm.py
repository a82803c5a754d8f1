"""Identities over real sockets: peers with keys train together; a key holder who claims
another peer's id, or forges its entry, gets nowhere; --allow-peers closes the run."""

import logging

import aiohttp
import pytest
from conftest import peer_config, run_async, stop_all, wait_until

from shoal.peer.errors import AuthError, Forbidden
from shoal.peer.identity import Identity
from shoal.peer.node import Peer
from shoal.peer.wire import WireCodec

pytestmark = pytest.mark.slow
ROUNDS = 2


async def post(codec: WireCodec, url: str, path: str, payload: dict) -> tuple[int, str]:
    body, headers = codec.encode("POST", path, payload)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(url + path, data=body, headers=headers) as resp:
            return resp.status, (await resp.read()).decode("utf-8", "replace")


def test_impostors_and_forged_entries_are_refused(corpus, tmp_path, caplog):
    async def scenario():
        kw = dict(max_rounds=ROUNDS, min_peers=3)
        # "a" is a name (bound to its key on first sight), the others' ids derive from keys
        first = Peer(peer_config(corpus, "a", identity=str(tmp_path / "a.key"), **kw))
        await first.start()
        rest = [
            Peer(
                peer_config(
                    corpus, None, bootstrap=first.address, identity=str(tmp_path / f"{i}.key"), **kw
                )
            )
            for i in (1, 2)
        ]
        peers = [first, *rest]
        impostor = None
        try:
            for p in rest:
                await p.start()
            assert all(p.peer_id == p.wire.identity.derived_id for p in rest)
            await wait_until(
                lambda: all(len(p.membership.peers) == 3 for p in peers), 30, "a full table"
            )
            swarm = first.wire.swarm_id
            # 1. a key holder with its own key claims "a": refused at /join
            impostor = Peer(peer_config(corpus, "a", bootstrap=rest[0].address, **kw))
            with pytest.raises(AuthError, match="bound to another key"):
                await impostor.start()
            # 2. ... and claims a derived id: refused whatever it sends
            thief = WireCodec(rest[0].peer_id, swarm, None, max_body_bytes=1 << 20)
            status, text = await post(thief, rest[1].address, "/gossip", {"digest": {}})
            assert status == 401 and "not derived from its key" in text
            # 3. a key holder relays a forged entry of "a" (its address moved): dropped
            mallory = WireCodec("mallory", swarm, None, max_body_bytes=1 << 20)
            genuine = rest[1].membership.peers["a"]
            forged = {
                **genuine.to_wire(),
                "address": "http://127.0.0.1:9",
                "revision": genuine.revision + 100,
            }
            with caplog.at_level(logging.WARNING, logger="shoal.peer.keybook"):
                status, _ = await post(mallory, rest[1].address, "/gossip", {"peers": [forged]})
            assert status == 200
            assert rest[1].membership.peers["a"].address == first.address
            assert "dropped the entry of 'a'" in caplog.text
            # training went on, everyone applied everyone's contributions
            await wait_until(lambda: all(p.finished.is_set() for p in peers), 90, "all rounds")
            ids = sorted(p.peer_id for p in peers)
            for p in peers:
                assert len(p.round_log) == ROUNDS and p.round_log[-1]["applied"] == ids
            assert len({p.round_log[-1]["weights_hash"] for p in peers}) == 1
        finally:
            await stop_all(peers + ([impostor] if impostor else []))

    run_async(scenario(), 150)


def test_a_key_not_on_the_allow_list_cannot_join(corpus, tmp_path):
    keys = {name: Identity.load_or_create(str(tmp_path / f"{name}.key")) for name in "abc"}
    allow = tmp_path / "allow.txt"
    allow.write_text("".join(f"{keys[n].public_hex}  # {n}\n" for n in "ab"))

    async def scenario():
        kw = dict(max_rounds=1, min_peers=2, allow_peers=str(allow))
        a = Peer(peer_config(corpus, "a", identity=str(tmp_path / "a.key"), **kw))
        await a.start()
        b = Peer(
            peer_config(corpus, "b", bootstrap=a.address, identity=str(tmp_path / "b.key"), **kw)
        )
        c = Peer(
            peer_config(corpus, "c", bootstrap=a.address, identity=str(tmp_path / "c.key"), **kw)
        )
        try:
            with pytest.raises(Forbidden, match="not on this run's --allow-peers list"):
                await c.start()
            await b.start()
            # nor may its key send anything else
            outsider = WireCodec(
                "c", a.wire.swarm_id, None, max_body_bytes=1 << 20, identity=keys["c"]
            )
            status, text = await post(outsider, a.address, "/gossip", {"digest": {}})
            assert status == 403 and "--allow-peers" in text
            await wait_until(lambda: a.finished.is_set() and b.finished.is_set(), 60, "round 1")
            assert a.round_log[-1]["applied"] == ["a", "b"]
            assert set(a.membership.peers) == {"a", "b"}
        finally:
            await stop_all([a, b, c])

    run_async(scenario(), 120)
