"""The incoming half of the transport: the aiohttp app every peer serves.

Handlers parse, validate, call the parts of `node` (the membership agent, the round store,
the state server, the stage service) and serialise; nothing else. Errors are mapped to HTTP
status codes in one middleware (see `peer.errors`). RPC endpoints take and return
authenticated msgpack envelopes (`peer.wire`); authenticating and unpacking a large request
and packing a large answer run in the executor (`client.off_loop`), and a prepared answer
(our round contribution, packed once) is sent as it is. The dashboard endpoints (`/`,
`/api/swarm`, `/metrics`) are read-only and unauthenticated.

Before a handler runs, the request's envelope is parsed strictly (400 when malformed),
authenticated (401), and its nonce admitted once by the replay cache (a replay is 401:
`peer.replay`). Every answer of an RPC route, error answers included, carries our
envelope: the request's nonce echoed and a MAC over the status and the body (the error
text), so a client can tell a peer's refusal from a forged one (`peer.client`).

    POST /join                {peer, run}            → {swarm_id, run, peers, round}
    POST /run                 {}                     → {definition, sha256, tokenizer}
    POST /gossip              {digest} | {peers}     → {peers, beats, want} | {}
    POST /round/contribution  {round, peer, wait_s}  → {round, peer, tensors} | 404
    POST /round/shard         {round, k, index, wait_s}
                                                     → {round, peer, k, index, data} | 404
    POST /round/reduced       {round, tag, index, wait_s}
                                                     → {round, tag, index, missing, data}
                                                        | 404 | 410   (peer.reduce)
    POST /round/set           {round, wait_s[, same_as]}
                                                     → {round, peers} | {round, same: true}
                                                        | 404   (peer.votes)
    POST /round/hash          {round, wait_s[, same_as]}
                                                     → {round, hash} | {round, same: true}
                                                        | 404   (peer.votes)
    POST /state/manifest      {}                     → {round, size, sha256, chunk_bytes,
                                                        num_chunks}
    POST /state/chunk         {round, index}         → {round, index, data} | 410
    POST /stage/forward, /stage/infer, /stage/backward, /stage/step   (pipeline/protocol.py)
    POST /ping                {}                     → {peer}   (a join's dial-back)
    POST /relay/poll, /relay/answer; ANY /relay/{peer}/{tail}   (peer.relay)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from shoal.peer.bodies import STEP_BYTES, write_stepped
from shoal.peer.client import Traffic, off_loop
from shoal.peer.dashboard import render_html
from shoal.peer.envelope import parse_fields, response_path
from shoal.peer.errors import NotFound, PayloadTooLarge, ProtocolError, ShoalError, Unavailable
from shoal.peer.metrics import render_metrics
from shoal.peer.reduce import serve_reduced, serve_shard
from shoal.peer.relay import RelayHub, read_body
from shoal.peer.replay import ReplayCache
from shoal.peer.roundstore import check_round_request
from shoal.peer.votes import serve_hash, serve_set
from shoal.peer.wire import Envelope, PreparedBody
from shoal.pipeline.worker import UnknownMicrobatch

if TYPE_CHECKING:
    from shoal.peer.node import Peer

log = logging.getLogger(__name__)
Handler = Callable[["Peer", Envelope], Awaitable[dict[str, Any] | PreparedBody]]
NODE: web.AppKey[Peer] = web.AppKey("node")
REPLAY: web.AppKey[ReplayCache] = web.AppKey("replay")
# Set on every request to an RPC route: the nonce its answer echoes (None until parsed).
ANSWER_NONCE: web.RequestKey[str | None] = web.RequestKey("answer_nonce")
# Second line of defence behind the dashboard's escaping: nothing from elsewhere, ever.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:"
)


class MalformedHttpFilter(logging.Filter):
    """aiohttp answers a request it cannot parse (a header over 8190 bytes, a control
    character in one) with 400 itself, but logs it as an ERROR with a traceback: anyone who
    can open a socket could fill the log with them. Here each becomes one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed HTTP request from %s: %d (%s)"
            record.args = (remote, exc.code, type(exc).__name__)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


if not any(isinstance(f, MalformedHttpFilter) for f in logging.getLogger("aiohttp.server").filters):
    logging.getLogger("aiohttp.server").addFilter(MalformedHttpFilter())


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ShoalError as exc:
        node: Peer = request.app[NODE]
        log.info("[%s] %s %s → %d: %s", node.peer_id, request.method, request.path, exc.status, exc)
        body = str(exc).encode("utf-8", "backslashreplace")
        headers = {}
        if ANSWER_NONCE in request:  # an RPC route: its refusals are signed like its answers
            digest = hashlib.sha256(body).digest()
            headers = node.wire.headers(
                "RESPONSE",
                response_path(request.path, exc.status),
                PreparedBody(body, "identity", digest),
                nonce=request[ANSWER_NONCE],
            )
        return web.Response(
            status=exc.status, body=body, headers=headers, content_type="text/plain"
        )


def rpc(
    handler: Handler, *, any_swarm: bool = False, max_body_bytes: int | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """Wrap a domain handler with envelope decoding, response signing and byte counting.
    `max_body_bytes`: this route's body limit, if not the app's (a relayed answer's)."""

    async def wrapped(request: web.Request) -> web.Response:
        node: Peer = request.app[NODE]
        wire = node.wire
        request[ANSWER_NONCE] = None
        try:
            body = await (
                request.read() if max_body_bytes is None else read_body(request, max_body_bytes)
            )
        except web.HTTPRequestEntityTooLarge:  # raised by aiohttp above client_max_size
            raise PayloadTooLarge(
                f"body exceeds the limit of {request.client_max_size} bytes"
            ) from None
        kind = Traffic.kind(request.path)
        node.traffic.received[kind] += len(body)
        fields = parse_fields(request.headers)
        request[ANSWER_NONCE] = fields.nonce
        large = len(body) >= wire.compress_above_bytes
        envelope = await off_loop(
            large,
            wire.decode,
            request.method,
            request.path,
            fields,
            body,
            any_swarm=any_swarm,
            max_bytes=max_body_bytes,
        )
        request.app[REPLAY].admit(envelope.sender, envelope.nonce, envelope.timestamp)
        answer = await handler(node, envelope)
        if not isinstance(answer, PreparedBody):
            answer = await off_loop(wire.is_large(answer), wire.prepare, answer)
        headers = wire.headers(
            "RESPONSE", response_path(request.path), answer, nonce=envelope.nonce
        )
        node.traffic.sent[kind] += len(answer.data)
        if len(answer.data) <= STEP_BYTES:
            return web.Response(
                body=answer.data, headers=headers, content_type="application/msgpack"
            )
        response = web.StreamResponse(headers=headers)
        response.content_type = "application/msgpack"
        return await write_stepped(request, response, answer.data)

    return wrapped


async def handle_join(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return await _agent(node).welcome(envelope)


async def handle_run(node: Peer, envelope: Envelope) -> dict[str, Any]:
    if node.run_answer is None:
        raise NotFound("this peer is still starting")
    return node.run_answer


async def handle_gossip(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return await _agent(node).gossip_answer(envelope)


def _agent(node: Peer):
    if node.agent is None:
        raise NotFound("this peer is still starting")
    return node.agent


async def handle_contribution(node: Peer, envelope: Envelope) -> PreparedBody | dict[str, Any]:
    round_id, wait_s = check_round_request(envelope.payload)
    owner = envelope.payload.get("peer")
    if not isinstance(owner, str):
        raise ProtocolError("peer must be a string")
    store = node.store
    answer = await store.wait_for(lambda: store.contributions.get(round_id, {}).get(owner), wait_s)
    if answer is None:
        raise NotFound(f"no round-{round_id} contribution of {owner} here")
    return answer


async def handle_shard(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return await serve_shard(node.store, node.peer_id, envelope.payload)


async def handle_reduced(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return await serve_reduced(node.store, envelope.payload)


async def handle_set(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return await serve_set(node.store, envelope.payload)


async def handle_hash(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return await serve_hash(node.store, envelope.payload)


async def handle_manifest(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return (await node.state_server.latest()).manifest()


async def handle_chunk(node: Peer, envelope: Envelope) -> dict[str, Any]:
    round_id, index = envelope.payload.get("round"), envelope.payload.get("index")
    if not isinstance(round_id, int) or not isinstance(index, int):
        raise ProtocolError("round and index must be integers")
    return {
        "round": round_id,
        "index": index,
        "data": node.state_server.blob(round_id).chunk(index),
    }


async def handle_ping(node: Peer, envelope: Envelope) -> dict[str, Any]:
    return {"peer": node.peer_id}


def relay_rpcs(hub: RelayHub) -> tuple[Handler, Handler]:
    """`/relay/poll` and `/relay/answer`: the peer behind NAT's side of `hub`."""

    async def poll(node: Peer, envelope: Envelope) -> dict[str, Any]:
        if node.agent is None or node.agent.me.relayed_by:
            raise Unavailable("this peer is starting, or behind NAT itself: it relays no one")
        return await hub.poll(envelope.sender, envelope.payload)

    async def answer(node: Peer, envelope: Envelope) -> dict[str, Any]:
        return hub.answer(envelope.sender, envelope.payload)

    return poll, answer


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
    return web.Response(
        text=render_html(request.app[NODE].swarm_snapshot()),
        content_type="text/html",
        headers={"Content-Security-Policy": CSP},
    )


async def api_swarm(request: web.Request) -> web.Response:
    return web.Response(
        text=json.dumps(request.app[NODE].swarm_snapshot()), content_type="application/json"
    )


async def metrics(request: web.Request) -> web.Response:
    text = render_metrics(request.app[NODE].swarm_snapshot())
    return web.Response(
        text=text,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def make_app(node: Peer, max_request_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_request_bytes, middlewares=[error_middleware])
    app[NODE] = node
    app[REPLAY] = ReplayCache(node.wire.max_clock_skew_s)
    app.router.add_post("/join", rpc(handle_join, any_swarm=True))
    app.router.add_post("/run", rpc(handle_run, any_swarm=True))
    app.router.add_post("/gossip", rpc(handle_gossip))
    app.router.add_post("/round/contribution", rpc(handle_contribution))
    app.router.add_post("/round/shard", rpc(handle_shard))
    app.router.add_post("/round/reduced", rpc(handle_reduced))
    app.router.add_post("/round/set", rpc(handle_set))
    app.router.add_post("/round/hash", rpc(handle_hash))
    app.router.add_post("/state/manifest", rpc(handle_manifest))
    app.router.add_post("/state/chunk", rpc(handle_chunk))
    for method in ("forward", "infer", "backward", "step"):
        app.router.add_post(f"/stage/{method}", rpc(stage_rpc(method)))
    app.router.add_post("/ping", rpc(handle_ping, any_swarm=True))
    hub = RelayHub(node.peer_id, node.traffic, node.config.protocol, max_request_bytes)
    poll, answer = relay_rpcs(hub)
    app.router.add_post("/relay/poll", rpc(poll))
    app.router.add_post("/relay/answer", rpc(answer, max_body_bytes=hub.answer_envelope_bytes))
    app.router.add_route("*", "/relay/{peer}/{tail:.*}", hub.handle)
    app.on_shutdown.append(hub.close)
    app.router.add_get("/", dashboard)
    app.router.add_get("/api/swarm", api_swarm)
    app.router.add_get("/metrics", metrics)
    return app
