"""The incoming half of the transport: the aiohttp app every peer serves.

Handlers parse, validate, call the domain objects of `node` and serialise; nothing else.
Errors are mapped to HTTP status codes in one middleware (see `peer.errors`). RPC
endpoints take and return authenticated msgpack envelopes (`peer.wire`); the dashboard
endpoints (`/`, `/api/swarm`, `/metrics`) are read-only and unauthenticated.

    POST /join                {peer, run}            → {swarm_id, run, peers, round}
    POST /gossip              {peers}                → {peers}
    POST /round/contribution  {round, peer, wait_s}  → {round, peer, tensors} | 404
    POST /round/set           {round, wait_s}        → {round, peers} | 404
    POST /round/hash          {round, wait_s}        → {round, hash} | 404
    POST /state/manifest      {}                     → {round, size, sha256, chunk_bytes, num_chunks}
    POST /state/chunk         {round, index}         → {round, index, data} | 410
    POST /stage/forward, /stage/infer, /stage/backward, /stage/step   (pipeline/protocol.py)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from shoal.peer.client import Traffic, response_path
from shoal.peer.dashboard import render_html, render_metrics
from shoal.peer.errors import NotFound, ProtocolError, ShoalError
from shoal.peer.membership import PeerInfo
from shoal.peer.rounds import check_round_request
from shoal.peer.wire import Envelope
from shoal.pipeline.worker import UnknownMicrobatch

if TYPE_CHECKING:
    from shoal.peer.node import Peer

log = logging.getLogger(__name__)
Handler = Callable[["Peer", Envelope], Awaitable[dict[str, Any]]]
NODE: web.AppKey[Peer] = web.AppKey("node")
# Second line of defence behind the dashboard's escaping: nothing from elsewhere, ever.
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ShoalError as exc:
        node: Peer = request.app[NODE]
        log.info("[%s] %s %s → %d: %s", node.peer_id, request.method, request.path, exc.status, exc)
        return web.Response(status=exc.status, text=str(exc))


def rpc(handler: Handler, *, any_swarm: bool = False) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap a domain handler with envelope decoding, response signing and byte counting."""

    async def wrapped(request: web.Request) -> web.Response:
        node: Peer = request.app[NODE]
        body = await request.read()  # aiohttp answers 413 itself above client_max_size
        kind = Traffic.kind(request.path)
        node.traffic.received[kind] += len(body)
        envelope = node.wire.decode(request.method, request.path, request.headers, body, any_swarm=any_swarm)
        payload = await handler(node, envelope)
        data, headers = node.wire.encode("RESPONSE", response_path(request.path), payload)
        node.traffic.sent[kind] += len(data)
        return web.Response(body=data, headers=headers, content_type="application/msgpack")

    return wrapped


async def handle_join(node: Peer, envelope: Envelope) -> dict[str, Any]:
    from shoal.peer.config import RunConfig

    run = envelope.payload.get("run")
    if not isinstance(run, dict):
        raise ProtocolError("join needs the joiner's run config")
    RunConfig.from_dict(run).check_same(node.config.run)
    entry = PeerInfo.from_wire(envelope.payload.get("peer"))
    if entry.peer_id != envelope.sender:
        raise ProtocolError("join entry's peer_id differs from the sender")
    node.membership.merge([entry.to_wire()])
    log.info("[%s] %s joined from %s", node.peer_id, entry.peer_id, entry.address)
    return {"swarm_id": node.wire.swarm_id, "run": node.config.run.to_dict(), "peers": node.membership.table(), "round": node.outer_round}


async def handle_gossip(node: Peer, envelope: Envelope) -> dict[str, Any]:
    node.membership.merge(envelope.payload.get("peers"))
    return {"peers": node.membership.table()}


async def handle_contribution(node: Peer, envelope: Envelope) -> dict[str, Any]:
    round_id, wait_s = check_round_request(envelope.payload)
    owner = envelope.payload.get("peer")
    if not isinstance(owner, str):
        raise ProtocolError("peer must be a string")
    store = node.store
    tensors = await store.wait_for(lambda: store.contributions.get(round_id, {}).get(owner), wait_s)
    if tensors is None:
        raise NotFound(f"no round-{round_id} contribution of {owner} here")
    return {"round": round_id, "peer": owner, "tensors": tensors}


async def _round_record(node: Peer, envelope: Envelope, table: dict[int, Any], what: str) -> tuple[int, Any]:
    """Long-poll one of the RoundStore's per-round tables (sets, hashes)."""
    round_id, wait_s = check_round_request(envelope.payload)
    value = await node.store.wait_for(lambda: table.get(round_id), wait_s)
    if value is None:
        raise NotFound(f"no round-{round_id} {what} yet")
    return round_id, value


async def handle_set(node: Peer, envelope: Envelope) -> dict[str, Any]:
    round_id, peers = await _round_record(node, envelope, node.store.sets, "set")
    return {"round": round_id, "peers": peers}


async def handle_hash(node: Peer, envelope: Envelope) -> dict[str, Any]:
    round_id, weights_hash = await _round_record(node, envelope, node.store.hashes, "hash")
    return {"round": round_id, "hash": weights_hash}


async def handle_manifest(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return (await node.state_server.latest()).manifest()


async def handle_chunk(node: Peer, envelope: Envelope) -> dict[str, Any]:
    round_id, index = envelope.payload.get("round"), envelope.payload.get("index")
    if not isinstance(round_id, int) or not isinstance(index, int):
        raise ProtocolError("round and index must be integers")
    return {"round": round_id, "index": index, "data": node.state_server.blob(round_id).chunk(index)}


def stage_rpc(method: str) -> Handler:
    """A `/stage/*` handler: hand the payload to this peer's StageService; malformed
    requests and payloads are 400, a backward for an unknown microbatch 404."""

    async def handler(node: Peer, envelope: Envelope) -> dict[str, Any]:
        if node.stage_service is None:
            raise NotFound("this peer serves no block stage")
        try:
            return await getattr(node.stage_service, method)(envelope.payload)
        except UnknownMicrobatch as exc:
            raise NotFound(f"no saved input for microbatch {exc.args[0]!r}") from None
        except ValueError as exc:  # StageRequestError, CodecError
            raise ProtocolError(str(exc)) from None

    return handler


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(text=render_html(request.app[NODE].swarm_snapshot()), content_type="text/html", headers={"Content-Security-Policy": CSP})


async def api_swarm(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(request.app[NODE].swarm_snapshot()), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    text = render_metrics(request.app[NODE].swarm_snapshot())
    return web.Response(text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


def make_app(node: Peer) -> web.Application:
    app = web.Application(client_max_size=node.config.protocol.max_request_bytes, middlewares=[error_middleware])
    app[NODE] = node
    app.router.add_post("/join", rpc(handle_join, any_swarm=True))
    app.router.add_post("/gossip", rpc(handle_gossip))
    app.router.add_post("/round/contribution", rpc(handle_contribution))
    app.router.add_post("/round/set", rpc(handle_set))
    app.router.add_post("/round/hash", rpc(handle_hash))
    app.router.add_post("/state/manifest", rpc(handle_manifest))
    app.router.add_post("/state/chunk", rpc(handle_chunk))
    for method in ("forward", "infer", "backward", "step"):
        app.router.add_post(f"/stage/{method}", rpc(stage_rpc(method)))
    app.router.add_get("/", dashboard)
    app.router.add_get("/api/swarm", api_swarm)
    app.router.add_get("/metrics", metrics)
    return app
