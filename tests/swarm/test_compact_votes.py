"""The compact set and hash votes (`peer.votes`) over a real socket, against one peer: a
bare "same" to an asker whose digest matches, the full vote otherwise, and a signed 400 for
a malformed `same_as` (never a 5xx)."""

import pytest
from conftest import client_of, peer_config, run_async

from shoal.peer.client import Traffic
from shoal.peer.errors import NotFound, ProtocolError
from shoal.peer.node import Peer
from shoal.peer.votes import DIGEST_BYTES, hash_digest, set_digest

KEY = "votes-key"
IDS = ["asker", "target", "third"]


def test_set_and_hash_answers_are_same_full_or_refused(corpus):
    async def scenario():
        peer = Peer(peer_config(corpus, "target", swarm_key=KEY))
        await peer.start(train=False)
        client = await client_of(peer, "asker", KEY)
        peer.store.put_set(2, IDS)
        peer.store.put_hash(2, "a" * 64)

        async def ask(path, **extra):
            try:
                answer = await client.call(peer.address, "POST", path, {"round": 2, **extra})
                return answer.payload
            except (ProtocolError, NotFound) as exc:
                return type(exc).__name__

        try:
            got = {
                "set same": await ask("/round/set", same_as=set_digest(reversed(IDS))),
                "set other": await ask("/round/set", same_as=set_digest(IDS[:2])),
                "set plain": await ask("/round/set"),
                "hash same": await ask("/round/hash", same_as=hash_digest("a" * 64)),
                "hash other": await ask("/round/hash", same_as=hash_digest("b" * 64)),
                "hash plain": await ask("/round/hash"),
                "unpublished": await ask("/round/set", round=3, same_as=set_digest(IDS)),
            }
            for path in ("/round/set", "/round/hash"):
                for bad in ("ab" * 8, b"x" * (DIGEST_BYTES - 1), b"x" * 64, None, 1, [b"x"]):
                    got[f"{path} {bad!r}"] = await ask(path, same_as=bad)
            return got
        finally:
            await client.close()
            await peer.stop()

    got = run_async(scenario(), 60)
    assert got.pop("set same") == got.pop("hash same") == {"round": 2, "same": True}
    assert got.pop("set other") == got.pop("set plain") == {"round": 2, "peers": IDS}
    assert got.pop("hash other") == got.pop("hash plain") == {"round": 2, "hash": "a" * 64}
    assert got.pop("unpublished") == "NotFound"
    assert set(got.values()) == {"ProtocolError"} and len(got) == 12


@pytest.mark.parametrize("path", ["/round/set", "/round/hash"])
def test_a_same_answer_is_smaller_than_the_vote_it_replaces(corpus, path):
    """What the change is for: the bytes of an agreeing answer do not grow with the set."""

    async def scenario():
        peer = Peer(peer_config(corpus, "target", swarm_key=KEY))
        await peer.start(train=False)
        traffic = Traffic()
        client = await client_of(peer, "asker", KEY, traffic)
        ids = [f"peer-{i}" for i in range(64)]
        peer.store.put_set(2, ids)
        peer.store.put_hash(2, "a" * 64)
        digest = set_digest(ids) if path == "/round/set" else hash_digest("a" * 64)
        try:
            sizes = []
            for extra in ({}, {"same_as": digest}):
                before = traffic.received[path.rsplit("/", 1)[1]]
                await client.call(peer.address, "POST", path, {"round": 2, **extra})
                sizes.append(traffic.received[path.rsplit("/", 1)[1]] - before)
            return sizes
        finally:
            await client.close()
            await peer.stop()

    full, same = run_async(scenario(), 60)
    assert same < 24 < full
