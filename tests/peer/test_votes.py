"""The set and hash votes' request and answer shapes (`peer.votes`), at the RoundStore level:
a bare "same" only to an asker whose digest matches our vote, the full vote otherwise, and
a malformed `same_as` refused before anything is waited for."""

import asyncio

import pytest

from shoal.peer.errors import NotFound, ProtocolError
from shoal.peer.roundstore import RoundStore
from shoal.peer.votes import (
    DIGEST_BYTES,
    check_same_as,
    hash_digest,
    hash_request,
    serve_hash,
    serve_set,
    set_digest,
    set_request,
)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_set_digest_ignores_order_and_repeats_but_not_how_ids_split():
    assert len(set_digest(["a", "b"])) == DIGEST_BYTES
    assert set_digest(["b", "a", "a"]) == set_digest(["a", "b"])
    assert set_digest(["a", "b"]) != set_digest(["a", "b", "c"])
    assert set_digest(["ab"]) != set_digest(["a", "b"])  # ids are length-prefixed
    assert set_digest(["a\x00\x00\x00\x01b"]) != set_digest(["a", "b"])
    assert set_digest([]) != set_digest([""])
    assert hash_digest("h1") != hash_digest("h2") and len(hash_digest("h1")) == DIGEST_BYTES


def test_requests_carry_a_digest_only_once_we_have_voted():
    assert set_request(3, None) == {"round": 3}
    assert set_request(3, ["b", "a"]) == {"round": 3, "same_as": set_digest(["a", "b"])}
    assert hash_request(3, None) == {"round": 3}
    assert hash_request(3, "h") == {"round": 3, "same_as": hash_digest("h")}


def store_with_votes() -> RoundStore:
    store = RoundStore()
    store.put_set(2, ["a", "b", "c"])
    store.put_hash(2, "f" * 64)
    return store


@pytest.mark.parametrize(
    ("same_as", "answer"),
    [
        (None, {"round": 2, "peers": ["a", "b", "c"]}),  # no digest: the full set
        (set_digest(["c", "b", "a"]), {"round": 2, "same": True}),
        (set_digest(["a", "b"]), {"round": 2, "peers": ["a", "b", "c"]}),
    ],
)
def test_a_set_answer_is_same_only_for_the_same_set(same_as, answer):
    payload = {"round": 2, "wait_s": 0} | ({} if same_as is None else {"same_as": same_as})
    assert run(serve_set(store_with_votes(), payload)) == answer


@pytest.mark.parametrize(
    ("same_as", "answer"),
    [
        (None, {"round": 2, "hash": "f" * 64}),
        (hash_digest("f" * 64), {"round": 2, "same": True}),
        (hash_digest("e" * 64), {"round": 2, "hash": "f" * 64}),
    ],
)
def test_a_hash_answer_is_same_only_for_the_same_hash(same_as, answer):
    payload = {"round": 2, "wait_s": 0} | ({} if same_as is None else {"same_as": same_as})
    assert run(serve_hash(store_with_votes(), payload)) == answer


BAD_SAME_AS = [
    "ab" * 16,
    b"x" * (DIGEST_BYTES - 1),
    b"x" * (DIGEST_BYTES + 1),
    b"",
    None,
    True,
    7,
    [b"x" * DIGEST_BYTES],
    {"d": b"x"},
    bytearray(DIGEST_BYTES),
]


@pytest.mark.parametrize("same_as", BAD_SAME_AS)
@pytest.mark.parametrize("serve", [serve_set, serve_hash])
def test_a_malformed_same_as_is_refused_before_any_wait(serve, same_as):
    """Refused even for a round we hold nothing of, and at once (the wait is 5 s)."""
    payload = {"round": 9, "wait_s": 5, "same_as": same_as}
    with pytest.raises(ProtocolError, match=f"same_as must be {DIGEST_BYTES} bytes"):
        run(asyncio.wait_for(serve(store_with_votes(), payload), 1))
    with pytest.raises(ProtocolError):
        check_same_as({"same_as": same_as})


def test_no_vote_yet_is_not_found_with_or_without_a_digest():
    for serve in (serve_set, serve_hash):
        for extra in ({}, {"same_as": b"x" * DIGEST_BYTES}):
            with pytest.raises(NotFound):
                run(serve(RoundStore(), {"round": 1, "wait_s": 0.05, **extra}))


def test_a_waiting_asker_gets_same_once_the_matching_set_is_published():
    async def main():
        store = RoundStore()
        request = {"round": 1, "wait_s": 2, "same_as": set_digest(["a", "b"])}
        waiter = asyncio.create_task(serve_set(store, request))
        await asyncio.sleep(0.05)
        store.put_set(1, ["a", "b"])
        return await waiter

    assert run(main()) == {"round": 1, "same": True}
