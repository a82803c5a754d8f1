"""The envelope as a hostile client sees it, against one real peer on 127.0.0.1.

Every RPC route × every envelope header × malformed values (non-ASCII, invalid UTF-8, empty,
huge, nan/inf/±1e308 times, wrong-length hex, missing, repeated) sent over a raw socket, so
the bytes arrive exactly as written, plus well-signed requests with malformed bodies: no
answer may be a 5xx and the peer's log may hold no "Error handling request" traceback.
Then the replay cache (a replayed request is refused before its handler runs), answers
bound to their request (a recorded answer served for another request is refused by the
client) and error answers that are authenticated (a forged or altered refusal is not
trusted)."""

import asyncio
import logging
from collections import Counter
from dataclasses import replace

import aiohttp
import msgpack
import pytest
from aiohttp import web
from conftest import FAST_PROTOCOL, client_of, peer_config, run_async

from shoal.peer.envelope import H_TIME, H_VERSION, PROTOCOL_VERSION
from shoal.peer.errors import NotFound, ProtocolError, ShoalError
from shoal.peer.node import Peer
from shoal.peer.wire import WireCodec

KEY = "fuzz-key"
ROUTES = {  # path -> a payload its handler refuses or answers without changing anything
    "/join": {"peer": {"peer_id": 5}},
    "/run": {},
    "/gossip": {"peers": []},
    "/round/contribution": {"round": 0, "peer": "nobody", "wait_s": 0},
    "/round/shard": {"round": 0, "k": 2, "index": 1, "wait_s": 0},
    "/round/reduced": {"round": 0, "tag": "x", "index": 0, "wait_s": 0},
    "/round/set": {"round": 0, "wait_s": 0},
    "/round/hash": {"round": 0, "wait_s": 0},
    "/state/manifest": {},
    "/state/chunk": {"round": 0, "index": 0},
    "/stage/forward": {},
    "/stage/infer": {},
    "/stage/backward": {},
    "/stage/step": {},
    "/ping": {},
    "/relay/poll": {"wait_s": 0},
    "/relay/answer": {"id": "0" * 32},
}
BAD_VALUES = [
    b"",
    b"\xc3\xa9t\xc3\xa9",  # UTF-8, not ASCII
    b"\xe9t\xe9",  # latin-1: not UTF-8
    b"\xff\xfe\xfd",
    b"\x80" * 32,
    b"ab" * 16 + b"\xff",
    b"a" * 6000,  # under aiohttp's 8190-byte header limit: reaches our parser
    b"a" * 20_000,  # over it: aiohttp's own 400
    b"a\x00b",  # control characters: aiohttp's own 400 too
    b"\x7f",
    b"7" * 300,
    b"nan",
    b"NaN",
    b"inf",
    b"-inf",
    b"-1e308",
    b"1e308",
    b"-1",
    b"1e3",
    b"0x1f",
    b" 12",
    b"3.0",
    b"99999",
    b"ab" * 31,  # hex one byte short of a nonce/MAC
    b"ab" * 33,
    b"AB" * 32,
    b"zz" * 32,
    b"<script>",
    b"../..",
    b"-",
    b"a b",
]


async def raw_post(port: int, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """POST over a raw socket (header bytes as given, nothing re-encoded); the status."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        lines = [
            b"POST " + path.encode() + b" HTTP/1.1",
            b"Host: 127.0.0.1",
            b"Connection: close",
            b"Content-Length: " + str(len(body)).encode(),
            *(name + b": " + value for name, value in headers),
        ]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1])


def signed(codec: WireCodec, path: str, payload=None, raw: bytes | None = None, **fields):
    """(headers as byte pairs, body) of a request signed by `codec`; `fields` override
    envelope headers before signing (a key holder's malformed but signed request)."""
    body, headers = codec.encode("POST", path, ROUTES[path] if payload is None else payload)
    body = body if raw is None else raw
    if fields or raw is not None:
        headers.update(fields)
        headers.update(codec.seal("POST", path, headers, body))
    return [(k.encode(), v.encode()) for k, v in headers.items()], body


def malformed_requests(codec: WireCodec):
    """(what, path, headers, body) of every request the fuzz sends: what is "envelope" for a
    malformed envelope, "body" for a well-signed request with an odd body."""
    for path in ROUTES:
        good, body = signed(codec, path)
        for i, (name, _) in enumerate(good):
            rest = good[:i] + good[i + 1 :]
            yield "envelope", path, rest, body  # missing
            yield "envelope", path, good + [good[i]], body  # repeated, same value
            yield "envelope", path, good + [(name, b"junk")], body  # repeated, another value
            for value in BAD_VALUES:
                yield "envelope", path, rest + [(name, value)], body
        for raw in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}), b"", b"\x91" * 5000):
            yield "body", path, *signed(codec, path, raw=raw)
        yield "body", path, *signed(codec, path, raw=b"not zstd", **{"X-Shoal-Encoding": "zstd"})
        odd = {"round": True, "index": 2**63 - 1, "peer": ["x"], "wait_s": 1e308, "peers": 7}
        yield "body", path, *signed(codec, path, payload=odd)
        yield "body", path, *signed(codec, path, payload={"round": -1, "wait_s": -1, "run": "x"})
        for same_as in ("ab" * 8, b"x" * 15, [b"x" * 16], None):  # a vote's digest (peer.votes)
            yield "body", path, *signed(codec, path, payload={**ROUTES[path], "same_as": same_as})


@pytest.fixture
def peer_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    return caplog


def test_no_malformed_envelope_gets_a_5xx_or_a_traceback(corpus, peer_logs):
    async def scenario():
        # a relay poll of wait_s 1e308 waits --relay-poll: short here
        protocol = replace(FAST_PROTOCOL, relay_poll_s=1.0)
        peer = Peer(peer_config(corpus, "target", swarm_key=KEY, protocol=protocol))
        await peer.start(train=False)
        try:
            codec = WireCodec("fuzzer", peer.wire.swarm_id, KEY, max_body_bytes=1 << 20)
            port = int(peer.address.rsplit(":", 1)[1])
            requests = list(malformed_requests(codec))
            gate = asyncio.Semaphore(16)

            async def send(what, path, headers, body):
                async with gate:
                    return what, path, await raw_post(port, path, headers, body)

            results = await asyncio.gather(*(send(*r) for r in requests))
            return peer.membership.peers.keys() - {"target"}, results
        finally:
            await peer.stop()

    strangers, results = run_async(scenario(), 60)
    statuses = {w: Counter(s for what, _, s in results if what == w) for w in ("envelope", "body")}
    print(f"\n{len(results)} requests over {len(ROUTES)} routes: {statuses}")
    assert len(results) > 2000 and not strangers
    assert [(p, s) for _, p, s in results if s >= 500] == []
    assert set(statuses["envelope"]) == {400, 401}  # malformed: 400; well-formed, bad MAC: 401
    tracebacks = [
        r.getMessage()
        for r in peer_logs.records
        if r.exc_info or r.levelno >= logging.ERROR or "Error handling request" in r.getMessage()
    ]
    assert tracebacks == []


def test_a_replayed_request_is_refused_before_its_handler(corpus):
    async def scenario():
        peer = Peer(peer_config(corpus, "target", swarm_key=KEY))
        await peer.start(train=False)
        steps = []

        class Stage:  # stands in for a StageService: the steps it makes are counted
            async def step(self, payload):
                steps.append(payload)
                return {"stepped": True}

        assert peer.role is not None and peer.stage_service is None
        peer.role.stage_service = Stage()
        peer.store.put_hash(0, "h0")
        try:
            codec = WireCodec("fuzzer", peer.wire.swarm_id, KEY, max_body_bytes=1 << 20)
            port = int(peer.address.rsplit(":", 1)[1])
            step = signed(codec, "/stage/step", {"stage": 0})
            hash_request = signed(codec, "/round/hash", {"round": 0})
            statuses = {
                "step": [await raw_post(port, "/stage/step", *step) for _ in range(3)],
                "hash": [await raw_post(port, "/round/hash", *hash_request) for _ in range(2)],
            }
            # the same message under a fresh nonce (as any key holder can sign) is new
            fresh = signed(codec, "/stage/step", {"stage": 0})
            statuses["fresh step"] = [await raw_post(port, "/stage/step", *fresh)]
            return statuses, len(steps)
        finally:
            await peer.stop()

    statuses, steps = run_async(scenario(), 60)
    assert statuses == {"step": [200, 401, 401], "hash": [200, 401], "fresh step": [200]}
    assert steps == 2  # the replays never reached the stage


def test_nan_and_infinite_times_are_refused_even_when_signed():
    codec = WireCodec("a", "s", KEY, max_body_bytes=1 << 20)
    for stamp in ("nan", "inf", "-1e308", "1e308", "1e400"):
        headers, body = signed(codec, "/gossip", **{H_TIME: stamp})
        with pytest.raises(ProtocolError, match="malformed envelope header X-Shoal-Time"):
            codec.decode("POST", "/gossip", {k.decode(): v.decode() for k, v in headers}, body)


async def mallory(answers: dict[str, tuple[int, dict[str, str], bytes]]) -> web.AppRunner:
    """A server that answers each path with a recorded (status, headers, body)."""

    async def serve(request: web.Request) -> web.Response:
        status, headers, body = answers[request.path]
        return web.Response(status=status, headers=headers, body=body)

    app = web.Application()
    app.router.add_post("/{tail:.*}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def test_a_recorded_altered_or_foreign_answer_is_refused_by_the_client(corpus):
    async def scenario():
        peer = Peer(peer_config(corpus, "target", swarm_key=KEY))
        await peer.start(train=False)
        client = await client_of(peer, "client", KEY)
        wire = client.wire
        peer.store.put_hash(3, "h3")
        recorded: dict[str, tuple[int, dict[str, str], bytes]] = {}

        async def record(path):  # what an eavesdropper keeps of one exchange
            body, headers = wire.encode("POST", path, {"round": 3, "wait_s": 0})
            session = client._session
            async with session.post(peer.address + path, data=body, headers=headers) as resp:
                kept = {k: v for k, v in resp.headers.items() if k.startswith("X-Shoal")}
                recorded[path] = (resp.status, kept, await resp.read())

        try:
            await record("/round/hash")
            await record("/round/set")  # a signed 404: no set for round 3 here
            assert recorded["/round/hash"][0] == 200 and recorded["/round/set"][0] == 404
            genuine = await client.call(peer.address, "POST", "/round/hash", {"round": 3})
            with pytest.raises(NotFound):  # a genuine, signed refusal keeps its type
                await client.call(peer.address, "POST", "/round/set", {"round": 3})
            _, set_headers, set_body = recorded["/round/set"]
            answers = {
                "/round/hash": recorded["/round/hash"],  # replayed for a new request
                "/round/set": (409, set_headers, set_body),  # the signed 404 as a 409
                "/state/manifest": (409, {}, b"refused"),  # unsigned
                "/run": (401, {H_VERSION: "2"}, b"bad or missing HMAC"),  # an older peer
            }
            runner = await mallory(answers)
            address = f"http://127.0.0.1:{runner.addresses[0][1]}"
            outcomes = {}
            try:
                for path in answers:
                    try:
                        await client.call(address, "POST", path, {"round": 3})
                        outcomes[path] = "accepted"
                    except ShoalError as exc:
                        outcomes[path] = f"{type(exc).__name__}: {exc}"
            finally:
                await runner.cleanup()
            return genuine.payload, outcomes
        finally:
            await client.close()
            await peer.stop()

    genuine, outcomes = run_async(scenario(), 60)
    assert genuine == {"round": 3, "hash": "h3"}
    assert (
        outcomes["/round/hash"].startswith("PeerUnreachable")
        and "another request" in (outcomes["/round/hash"])
    )
    assert outcomes["/round/set"].startswith("PeerUnreachable: http://127.0.0.1")
    assert "unauthenticated HTTP 409 answer: bad or missing HMAC" in outcomes["/round/set"]
    assert outcomes["/state/manifest"].startswith("PeerUnreachable")
    assert "missing envelope header" in outcomes["/state/manifest"]
    assert outcomes["/run"].startswith("VersionMismatch") and outcomes["/run"].endswith(
        f"/run: answered in protocol version 2, this peer speaks {PROTOCOL_VERSION}"
    )


def test_a_peer_of_another_version_gets_a_clear_error(corpus):
    async def scenario():
        peer = Peer(peer_config(corpus, "target", swarm_key=KEY))
        await peer.start(train=False)
        try:
            codec = WireCodec("old", peer.wire.swarm_id, KEY, max_body_bytes=1 << 20)
            headers, body = signed(codec, "/gossip", **{H_VERSION: "2"})
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    peer.address + "/gossip",
                    data=body,
                    headers=[(k.decode(), v.decode()) for k, v in headers],
                ) as resp:
                    return resp.status, await resp.text()
        finally:
            await peer.stop()

    status, text = run_async(scenario(), 60)
    assert status == 400 and text == f"protocol version 2, this peer speaks {PROTOCOL_VERSION}"
