"""Relays and client mode (`peer.relay`, `peer.tunnel`) over real loopback sockets: small
apps made by the peer's own `make_app` around a stand-in node (no model, no data), a
requester's `PeerClient`, and the tunnel of a peer behind NAT."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from shoal.peer.client import PeerClient, PeerUnreachable, Traffic
from shoal.peer.config import NetworkConfig
from shoal.peer.errors import AuthError, ProtocolError, ShoalError
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.protocol_config import ProtocolConfig
from shoal.peer.relay import Relayed, RelayedAnswer, relayed_headers
from shoal.peer.server import make_app, rpc
from shoal.peer.tasks import TaskOwner
from shoal.peer.tunnel import (
    RelayTunnel,
    choose_relays,
    local_url,
    needs_client_mode,
    relay_address,
)
from shoal.peer.wire import WireCodec

SWARM, KEY = "relay-swarm", "relay-key"
PROTOCOL = ProtocolConfig(
    heartbeat_interval_s=0.2,
    relay_poll_s=1.0,
    relay_idle_s=1.0,
    relay_failures=2,
    dial_back_timeout_s=2.0,
    request_timeout_s=10.0,
)


def codec(peer_id: str) -> WireCodec:
    return WireCodec(peer_id, SWARM, KEY, max_body_bytes=8 << 20)


async def echo(node, envelope):
    """A test route: the payload back, so bodies of any size cross the relay."""
    return {"peer": node.peer_id, "data": envelope.payload.get("data", b"")}


class App:
    """One `make_app` app on 127.0.0.1:0 around a stand-in node."""

    def __init__(self, peer_id: str, protocol: ProtocolConfig = PROTOCOL) -> None:
        self.wire = codec(peer_id)
        self.traffic = Traffic()
        self.me = PeerInfo(peer_id, "http://unset")
        self.node = SimpleNamespace(
            peer_id=peer_id,
            wire=self.wire,
            traffic=self.traffic,
            config=SimpleNamespace(protocol=protocol),
            agent=SimpleNamespace(me=self.me),
        )
        self.runner: web.AppRunner | None = None

    async def start(self) -> App:
        app = make_app(self.node, 8 << 20)
        app.router.add_post("/echo", rpc(echo))
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]
        self.me.address = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def requester(peer_id: str = "asker") -> PeerClient:
    client = PeerClient(codec(peer_id), Traffic(), request_timeout_s=10, max_response_bytes=1 << 30)
    await client.start()
    return client


async def tunnel_for(nat: App, relays: list[App], protocol: ProtocolConfig = PROTOCOL):
    membership = Membership(nat.me, dead_after_s=600, forget_after_s=900)
    membership.take([PeerInfo(r.node.peer_id, r.me.address) for r in relays])
    announced = []

    async def announce():
        announced.append(nat.me.address)

    tasks = TaskOwner(nat.node.peer_id)
    tunnel = RelayTunnel(
        membership, nat.wire, protocol, tasks, local_url("127.0.0.1", nat.port), announce
    )
    await tunnel.start()
    return tunnel, tasks, announced


def run(coro, timeout_s: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


# ---- pure parts -------------------------------------------------------------------------


def test_client_mode_decision():
    assert needs_client_mode("no", "http://b", None)
    assert not needs_client_mode("yes", "http://b", False)
    assert not needs_client_mode("auto", None, None)  # the first peer of a run
    assert needs_client_mode("auto", "http://b", False)
    assert not needs_client_mode("auto", "http://b", True)
    assert not needs_client_mode("auto", "http://b", None)  # not dialled back: trusted
    with pytest.raises(ValueError, match="--reachable no needs --bootstrap"):
        NetworkConfig(reachable="no")
    with pytest.raises(ValueError, match="--reachable"):
        NetworkConfig(reachable="maybe", bootstrap="http://b")


def test_relays_are_chosen_deterministically_and_never_relayed_ones():
    peers = [PeerInfo(f"p{i}", f"http://10.0.0.{i}:7000") for i in range(20)]
    peers[3].relayed_by = "p1,p2"
    first = choose_relays("nat", peers, 2)
    assert first == choose_relays("nat", list(reversed(peers)), 2) and len(first) == 2
    assert "p3" not in choose_relays("nat", peers, 20)
    # rendezvous: removing peers that were not chosen changes nothing
    fewer = [p for i, p in enumerate(peers) if p.peer_id in first or i % 3]
    assert choose_relays("nat", fewer, 2) == first
    # different peers behind NAT spread over the swarm
    chosen = {choose_relays(f"nat-{i}", peers, 1)[0] for i in range(40)}
    assert len(chosen) >= 8
    long = PeerInfo("far", "http://x/" + "a" * 240)
    assert choose_relays("nat", [long], 2) == []  # its relay URL would not fit an entry
    assert relay_address(peers[0], "nat") == "http://10.0.0.0:7000/relay/nat"


def test_local_url():
    assert local_url("0.0.0.0", 5) == "http://127.0.0.1:5"
    assert local_url("::", 5) == "http://[::1]:5"
    assert local_url("10.78.2.2", 7000) == "http://10.78.2.2:7000"


def test_relayed_messages_are_checked_field_by_field():
    good = Relayed("ab" * 16, "POST", "/gossip", [("X-Shoal-Peer", "a")], b"x").to_wire()
    assert Relayed.from_wire(good, 10).path == "/gossip"
    for bad in (
        {**good, "id": "x"},
        {**good, "method": "DELETE"},
        {**good, "path": "http://evil/"},
        {**good, "path": "/a b"},
        {**good, "headers": [["X-Shoal-Peer", "a\r\nInjected: 1"]]},
        {**good, "headers": {"X-Shoal-Peer": "a"}},
        {**good, "body": "text"},
        {**good, "body": b"x" * 11},
        [1, 2],
    ):
        with pytest.raises(ShoalError):  # ProtocolError, PayloadTooLarge
            Relayed.from_wire(bad, 10)
    for status in (101, 600, True, "200"):
        with pytest.raises(ProtocolError):
            RelayedAnswer.from_wire({"status": status, "headers": [], "body": b""}, 10)
    kept = relayed_headers({"X-Shoal-Peer": "a", "Cookie": "c", "Content-Type": "t", "Host": "h"})
    assert kept == [("X-Shoal-Peer", "a"), ("Content-Type", "t")]


# ---- over sockets -----------------------------------------------------------------------


def test_requests_cross_the_relay_end_to_end_and_latency_is_small():
    async def scenario():
        relay, nat = await App("relay").start(), await App("nat").start()
        asker = await requester()
        tunnel = tasks = None
        try:
            tunnel, tasks, announced = await tunnel_for(nat, [relay])
            address = nat.me.address
            assert address == f"{relay.me.address}/relay/nat" and nat.me.relayed_by == "relay"
            assert announced == [address]
            answer = await asker.call(address, "POST", "/ping", {})
            assert answer.sender == "nat" and answer.key == nat.wire.identity.public_hex
            assert answer.payload == {"peer": "nat"}
            # a body over the compression threshold and over a write step, both ways
            data = random.Random(0).randbytes(3_000_000)  # incompressible
            big = await asker.call(address, "POST", "/echo", {"data": data})
            assert big.payload["data"] == data and big.sender == "nat"
            # an error answer is the peer behind's, signed: a typed error, not "unreachable"
            with pytest.raises(ProtocolError, match="peer must be a string"):
                await asker.call(address, "POST", "/round/contribution", {"round": 0})
            assert relay.traffic.received["relay"] > 2 * len(data)  # both legs counted
            assert relay.traffic.sent["relay"] > 2 * len(data)
            # the added latency of one relayed round trip, against a direct one (printed)
            timings = {}
            for name, url in (("direct", f"http://127.0.0.1:{nat.port}"), ("relayed", address)):
                started = time.perf_counter()
                for _ in range(30):
                    await asker.call(url, "POST", "/ping", {})
                timings[name] = (time.perf_counter() - started) / 30
            print(
                f"\n/ping on loopback: direct {timings['direct'] * 1e3:.2f} ms, "
                f"relayed {timings['relayed'] * 1e3:.2f} ms"
            )
            assert timings["relayed"] < 0.5
        finally:
            if tasks is not None:
                await tasks.close()
            await asker.close()
            await relay.stop()
            await nat.stop()

    run(scenario())


def test_an_unpolled_peer_and_a_full_queue_are_refused_at_once():
    async def scenario():
        protocol = replace(PROTOCOL, relay_max_pending=2, relay_idle_s=1.5)
        relay = await App("relay", protocol).start()
        nat = codec("nat")
        client = PeerClient(nat, Traffic(), request_timeout_s=5, max_response_bytes=1 << 20)
        await client.start()
        try:
            async with aiohttp.ClientSession() as session:
                url = f"{relay.me.address}/relay/nat/ping"
                started = time.monotonic()
                async with session.post(url, data=b"") as resp:
                    assert resp.status == 503 and "does not poll" in await resp.text()
                assert time.monotonic() - started < 1.0
                # registered (a poll of wait 0), then nobody polls: two requests wait ...
                await client.call(relay.me.address, "POST", "/relay/poll", {"wait_s": 0})
                waiting = [asyncio.ensure_future(session.post(url, data=b"")) for _ in range(2)]
                await asyncio.sleep(0.3)
                started = time.monotonic()
                async with session.post(url, data=b"") as resp:  # ... the third is refused
                    assert resp.status == 503 and "relay-max-pending" in await resp.text()
                assert time.monotonic() - started < 1.0
                # once the peer has not polled for relay_idle_s, the waiting ones get 503 too
                done = await asyncio.wait_for(asyncio.gather(*waiting), 3 * 1.5 + 2)
                assert [r.status for r in done] == [503, 503]
                for r in done:
                    r.release()
                async with session.delete(url) as resp:
                    assert resp.status == 405
                bad = {"X-Shoal-Peer": "caf\u00e9".encode().decode("latin-1")}
                async with session.post(url, data=b"", headers=bad) as resp:
                    assert resp.status == 400
        finally:
            await client.close()
            await relay.stop()

    run(scenario())


def test_a_relay_that_dies_is_replaced_and_the_new_address_works():
    async def scenario():
        relays = [await App(f"relay-{i}").start() for i in range(2)]
        nat = await App("nat").start()
        asker = await requester()
        tasks = None
        try:
            tunnel, tasks, announced = await tunnel_for(nat, relays)
            primary, backup = nat.me.relayed_by.split(",")
            assert sorted([primary, backup]) == ["relay-0", "relay-1"]
            assert nat.me.address.endswith("/relay/nat") and primary in tunnel.relays
            by_id = {r.node.peer_id: r for r in relays}
            await by_id[primary].stop()  # the primary relay goes away
            deadline = time.monotonic() + 10
            while nat.me.relayed_by != backup:
                assert time.monotonic() < deadline, "the tunnel did not fail over"
                await asyncio.sleep(0.1)
            assert nat.me.address == f"{by_id[backup].me.address}/relay/nat"
            assert announced[-1] == nat.me.address and primary in tunnel.banned
            answer = await asker.call(nat.me.address, "POST", "/ping", {})
            assert answer.sender == "nat"
        finally:
            if tasks is not None:
                await tasks.close()
            await asker.close()
            for app in [*relays, nat]:
                await app.stop()

    run(scenario())


def test_a_relay_cannot_alter_an_answer_or_a_request():
    """The relay is played by hand here: it polls, replays to the peer behind NAT, and
    alters what passes. The requester refuses the altered answer as unauthenticated, and
    the peer behind NAT refuses the altered request (401, which the requester sees)."""

    async def scenario():
        relay, nat = await App("relay").start(), await App("nat").start()
        asker = await requester()
        poller = PeerClient(nat.wire, Traffic(), request_timeout_s=5, max_response_bytes=1 << 20)
        await poller.start()
        try:
            relay_url = relay.me.address
            await poller.call(relay_url, "POST", "/relay/poll", {"wait_s": 0})
            for what in ("answer", "request"):
                asked = asyncio.ensure_future(
                    asker.call(f"{relay_url}/relay/nat", "POST", "/echo", {"data": b"12345"})
                )
                polled = await poller.call(relay_url, "POST", "/relay/poll", {"wait_s": 2})
                (item,) = polled.payload["requests"]
                request = Relayed.from_wire(item, 1 << 20)
                body = request.body.replace(b"12345", b"12346") if what == "request" else None
                async with aiohttp.ClientSession(auto_decompress=False) as session:
                    async with session.post(
                        f"http://127.0.0.1:{nat.port}{request.path}",
                        headers=dict(request.headers),
                        data=body or request.body,
                    ) as resp:
                        status, headers = resp.status, relayed_headers(resp.headers)
                        answer = await resp.read()
                if what == "request":
                    assert status == 401
                else:
                    assert status == 200 and b"12345" in answer
                    answer = answer.replace(b"12345", b"99999")
                await poller.call(
                    relay_url,
                    "POST",
                    "/relay/answer",
                    {"id": request.id, "status": status, "headers": headers, "body": answer},
                )
                if what == "request":  # the peer behind's own, signed refusal
                    with pytest.raises(AuthError, match="bad or missing HMAC"):
                        await asked
                else:
                    with pytest.raises(PeerUnreachable, match="unauthenticated HTTP 200"):
                        await asked
        finally:
            await poller.close()
            await asker.close()
            await relay.stop()
            await nat.stop()

    run(scenario())
