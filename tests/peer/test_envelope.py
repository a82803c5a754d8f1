"""Strict envelope parsing, answers bound to their request, and the replay cache's bounds."""

import random

import pytest
from multidict import CIMultiDict

from shoal.peer.envelope import (
    H_ENCODING,
    H_MAC,
    H_NONCE,
    H_PEER,
    H_SWARM,
    H_TIME,
    H_VERSION,
    PROTOCOL_VERSION,
    VersionMismatch,
    parse_fields,
    response_path,
)
from shoal.peer.errors import AuthError, ProtocolError
from shoal.peer.replay import ReplayCache
from shoal.peer.wire import WireCodec


def codec(peer="p1", key="secret"):
    return WireCodec(peer, "swarm-a", key, max_body_bytes=1 << 20)


def request(payload=None):
    body, headers = codec().encode("POST", "/gossip", payload or {"x": 1})
    return body, headers


def test_every_field_is_checked_for_its_shape_before_use():
    body, headers = request()
    assert parse_fields(headers).nonce == headers[H_NONCE]
    bad = {
        H_VERSION: ["", "3.0", "-3", "\u0663"],  # an Arabic-Indic 3 is a digit to int()
        H_SWARM: ["", "a b", "s" * 129, "\udcff"],  # surrogate: a non-UTF-8 byte via aiohttp
        H_PEER: ["", "é", "x\ty", "p" * 129],
        H_TIME: ["nan", "inf", "-inf", "-1e308", "1e308", "-1", "1_000", " 1", "0x10", ""],
        H_NONCE: ["ab" * 15, "ab" * 17, "AB" * 16, "zz" * 16, "ab" * 15 + "\udcff\udcfe"],
        H_ENCODING: ["gzip", "ZSTD", ""],
        H_MAC: ["ab" * 31, "AB" * 32, "g" * 64, "ab" * 32 + "\u00e9"],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ProtocolError, match=f"malformed envelope header {name}"):
                codec().decode("POST", "/gossip", {**headers, name: value}, body)
    for name in [H_VERSION, H_SWARM, H_PEER, H_TIME, H_NONCE, H_ENCODING]:
        with pytest.raises(ProtocolError, match=f"missing envelope header {name}"):
            parse_fields({k: v for k, v in headers.items() if k != name})
    with pytest.raises(AuthError, match="HMAC"):  # absent, where a key is set: 401
        codec().decode("POST", "/gossip", {k: v for k, v in headers.items() if k != H_MAC}, body)


def test_a_repeated_header_is_refused_even_with_the_same_value():
    body, headers = request()
    for name in (H_TIME, H_NONCE, H_MAC):
        twice = CIMultiDict(headers)
        twice.add(name.lower(), headers[name])
        with pytest.raises(ProtocolError, match=f"{name} given 2 times"):
            codec().decode("POST", "/gossip", twice, body)


def test_the_version_is_checked_first_so_its_error_is_the_one_reported():
    body, headers = request()
    old = {**headers, H_VERSION: "2", H_NONCE: "not a nonce"}  # a v2 peer sends no nonce
    speaks = f"protocol version 2, this peer speaks {PROTOCOL_VERSION}"
    with pytest.raises(VersionMismatch, match=speaks):
        codec().decode("POST", "/gossip", old, body)


def test_an_answer_is_bound_to_its_request_nonce_and_status():
    server, client = codec("server"), codec("client")
    body = server.prepare({"round": 3, "hash": "h"})
    nonce = "ab" * 16
    headers = server.headers("RESPONSE", response_path("/round/hash"), body, nonce=nonce)
    env = client.decode(
        "RESPONSE", response_path("/round/hash"), headers, body.data, expect_nonce=nonce
    )
    assert env.payload == {"round": 3, "hash": "h"} and env.nonce == nonce
    with pytest.raises(AuthError, match="another request"):
        client.decode(
            "RESPONSE", response_path("/round/hash"), headers, body.data, expect_nonce="cd" * 16
        )
    refusal = server.headers("RESPONSE", response_path("/round/set", 404), body, nonce=nonce)
    with pytest.raises(AuthError, match="HMAC"):  # a signed 404 is no signed 409
        client.decode(
            "RESPONSE", response_path("/round/set", 409), refusal, body.data, expect_nonce=nonce
        )


def test_every_request_gets_a_fresh_nonce():
    nonces = {request()[1][H_NONCE] for _ in range(200)}
    assert len(nonces) == 200 and all(len(n) == 32 for n in nonces)


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_a_nonce_is_accepted_once_per_sender_until_it_expires():
    clock = Clock()
    cache = ReplayCache(300, clock=clock)
    cache.admit("a", "n1", 1000.0)
    with pytest.raises(AuthError, match="replayed"):
        cache.admit("a", "n1", 1000.0)
    cache.admit("b", "n1", 1000.0)  # another sender's nonce space
    assert len(cache) == 2
    clock.now = 1000.0 + 301  # the skew check refuses a replay of these by itself now
    cache.admit("a", "n2", clock.now)
    assert len(cache) == 2  # a's n1 dropped; b's is dropped when b is next seen or evicted


def test_a_flooding_sender_evicts_only_its_own_nonces_and_raises_its_own_floor():
    clock = Clock()
    cache = ReplayCache(300, max_nonces=8, clock=clock)
    cache.admit("honest", "h1", 999.0)
    for i in range(50):
        cache.admit("flood", f"f{i}", 1000.0 + i / 100)
    assert len(cache) == 8
    with pytest.raises(AuthError, match="replayed"):  # the honest nonce is still known
        cache.admit("honest", "h1", 999.0)
    cache.admit("honest", "h2", 998.0)  # an older stamp is fine: its floor did not move
    with pytest.raises(AuthError, match="overflowed"):  # what flood forgot, it cannot send
        cache.admit("flood", "f0", 1000.0)
    cache.admit("flood", "f99", 1001.0)


def test_too_many_senders_raise_the_floor_no_further_than_the_oldest_one():
    clock = Clock()
    cache = ReplayCache(300, max_senders=3, clock=clock)
    cache.admit("old", "n", 900.0)
    cache.admit("a", "n", 1000.0)
    for i in range(3):  # senders stamped in the future cannot push the floor past the present
        cache.admit(f"future{i}", "n", 1290.0)
    assert cache.floor == 1000.0  # "old", then "a" went
    with pytest.raises(AuthError, match="overflowed"):
        cache.admit("b", "m", 1000.0)
    cache.admit("b", "m", 1000.5)  # evicts future0, and the floor stops at the present
    assert cache.floor == clock.now == 1000.0
    cache.admit("future0", "n2", 1001.0)
    clock.now = 1591.0  # every entry has left the window (the last at 1290 + 300)
    cache.admit("c", "n", 1591.0)  # a sender with nothing unexpired goes without a floor
    assert cache.floor == 1000.0 and len(cache) == 1


def test_the_bounds_hold_under_random_traffic():
    clock = Clock()
    cache = ReplayCache(300, max_senders=8, max_nonces=100, clock=clock)
    rng = random.Random(0)
    accepted = set()
    for i in range(5000):
        clock.now += rng.random() * 0.2
        sender, nonce = f"s{rng.randrange(20)}", f"n{i}"
        stamp = clock.now - rng.random() * 5
        try:
            cache.admit(sender, nonce, stamp)
            accepted.add((sender, nonce, stamp))
        except AuthError:
            pass
        assert len(cache) <= 100 and len(cache._senders) <= 8
    assert len(accepted) > 1000
    replays = 0
    for sender, nonce, stamp in sorted(accepted, key=lambda a: -a[2])[:200]:
        with pytest.raises(AuthError):  # remembered, or at or under a floor
            cache.admit(sender, nonce, stamp)
        replays += 1
    assert replays == 200
