"""Relays: how a peer behind NAT is reached (issue 22, item 4; README: Peers behind NAT).

A peer that cannot accept connections runs in client mode (`peer.tunnel`): it keeps a long
poll open to each of two reachable peers, its relays, and advertises
`RELAY_ADDRESS/relay/<its id>` as its address. Whatever any peer sends there reaches it
through its poll, and the answer goes back the same way:

    requester ── POST /relay/<id>/gossip ──▶ relay ══ poll answer ══▶ peer behind NAT, which
                                                                      replays it against its
                                                                      own server (loopback)
    requester ◀───────── its raw answer ──── relay ◀══ POST /relay/answer ══

    POST /relay/poll    {wait_s}                     → {requests: [{id, method, path,
                                                        headers, body}]}: at most
                                                        relay_batch, [] after wait_s | 503
    POST /relay/answer  {id, status, headers, body}  → {} | 404 (its requester gave up)
    GET|POST /relay/{peer}/{tail}    raw, not enveloped here → the peer's raw answer | 503

`/relay/poll` and `/relay/answer` are signed RPCs whose sender is the peer behind NAT: only
it polls and answers its own requests. The raw route passes on the request as it came
(method, path `/{tail}`, body, and only the envelope headers X-Shoal-* and Content-Type/
Content-Encoding; `relayed_headers`) and the answer likewise. Envelopes are end to end:
the requester signs the path it asks for (`/gossip`, not the relay's URL), the peer behind
NAT checks it, and its answer is signed by it and bound to the request's nonce. So a relay
can delay or drop messages, and read them (as anyone on the path can without TLS), but it
can neither alter nor forge one: an altered answer fails the requester's check and counts
as no answer (`peer.client`); an altered request is refused by the peer behind (401).

Limits (`ProtocolConfig`): `relay_max_clients` clients per relay (503 beyond); a client
that has not polled for `relay_idle_s` is dropped, and requests for a peer that is not
polling, or beyond `relay_max_pending` queued or in flight for it, are refused at once
(503); a forwarded request waits at most `relay_timeout_s` for its answer (503 after);
request bodies up to --max-request-bytes, answers up to --max-response-bytes. A requester
that gives up (closes its connection) takes its request out of the queue. A relay counts
every byte it forwards in its Traffic under "relay", both legs: its link carries everything
sent to (and answered by) its clients twice. A peer that is itself relayed relays no one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from shoal.peer.bodies import read_capped, write_stepped
from shoal.peer.client import Traffic
from shoal.peer.envelope import show
from shoal.peer.errors import NotFound, PayloadTooLarge, ProtocolError, Unavailable
from shoal.peer.protocol_config import ProtocolConfig

log = logging.getLogger(__name__)

METHODS = ("GET", "POST")
CONTENT_HEADERS = frozenset({"content-type", "content-encoding"})
MAX_HEADERS = 24
HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
HEADER_VALUE = re.compile(r"[\x20-\x7e]{0,512}")  # printable ASCII: no CR/LF, no surrogates
PATH = re.compile(r"/[A-Za-z0-9._~:@+/-]{0,255}")  # our routes and peer ids, nothing else
REQUEST_ID = re.compile(r"[0-9a-f]{32}")
# an answer is the peer behind's, served from our origin: nothing in it may run as ours
RELAYED_SAFETY = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox allow-scripts; default-src 'none'; "
    "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:",
}

Headers = list[tuple[str, str]]


def relayed_headers(headers: Mapping[str, str] | Any) -> Headers:
    """The headers a relay passes on (X-Shoal-*, Content-Type, Content-Encoding), repeats
    kept (the envelope parser refuses them where it matters); ProtocolError for a value
    that is not printable ASCII."""
    items = headers.items() if hasattr(headers, "items") else headers
    kept = []
    for name, value in items:
        lower = str(name).lower()
        if not (lower.startswith("x-shoal-") or lower in CONTENT_HEADERS):
            continue
        if not HEADER_NAME.fullmatch(name) or not HEADER_VALUE.fullmatch(value):
            raise ProtocolError(f"relayed header {show(name)} has a malformed value")
        kept.append((name, value))
    if len(kept) > MAX_HEADERS:
        raise ProtocolError(f"more than {MAX_HEADERS} relayed headers")
    return kept


def _headers_from_wire(obj: Any) -> Headers:
    if not isinstance(obj, list) or not all(
        isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in obj
    ):
        raise ProtocolError("relayed headers must be a list of [name, value] strings")
    return relayed_headers([(name, value) for name, value in obj])


def _bytes(obj: Any, what: str, limit: int) -> bytes:
    if not isinstance(obj, bytes):
        raise ProtocolError(f"relayed {what} must be bytes")
    if len(obj) > limit:
        raise PayloadTooLarge(f"relayed {what} of {len(obj)} bytes exceeds {limit}")
    return obj


@dataclass(frozen=True)
class Relayed:
    """One request on its way to the peer behind NAT."""

    id: str
    method: str
    path: str
    headers: Headers
    body: bytes

    def to_wire(self) -> dict[str, Any]:
        headers = [[name, value] for name, value in self.headers]
        return {
            "id": self.id,
            "method": self.method,
            "path": self.path,
            "headers": headers,
            "body": self.body,
        }

    @classmethod
    def from_wire(cls, obj: Any, max_body_bytes: int) -> Relayed:
        """Checked as the peer behind NAT must: the relay may be hostile."""
        if not isinstance(obj, dict):
            raise ProtocolError("a relayed request must be a map")
        rid, method, path = obj.get("id"), obj.get("method"), obj.get("path")
        if not isinstance(rid, str) or not REQUEST_ID.fullmatch(rid):
            raise ProtocolError("relayed request id must be 32 hex digits")
        if method not in METHODS:
            raise ProtocolError(f"relayed method must be one of {METHODS}")
        if not isinstance(path, str) or not PATH.fullmatch(path):
            raise ProtocolError(f"relayed path {show(path)} is not one of ours")
        headers = _headers_from_wire(obj.get("headers"))
        return cls(rid, method, path, headers, _bytes(obj.get("body"), "body", max_body_bytes))


@dataclass(frozen=True)
class RelayedAnswer:
    """The raw answer of the peer behind NAT, as its server gave it."""

    status: int
    headers: Headers
    body: bytes

    def to_wire(self) -> dict[str, Any]:
        headers = [[name, value] for name, value in self.headers]
        return {"status": self.status, "headers": headers, "body": self.body}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any], max_body_bytes: int) -> RelayedAnswer:
        status = obj.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status < 600:
            raise ProtocolError("relayed status must be an integer in 200..599")
        headers = _headers_from_wire(obj.get("headers"))
        return cls(status, headers, _bytes(obj.get("body"), "answer", max_body_bytes))


@dataclass
class _Pending:
    request: Relayed
    answer: asyncio.Future


@dataclass
class _Client:
    """One peer behind NAT that polls us: its requests not yet handed over (`queue`) and
    all those not yet answered (`pending`, by id)."""

    last_poll: float
    queue: deque[_Pending] = field(default_factory=deque)
    pending: dict[str, _Pending] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    polls: int = 0  # polls open now


class RelayHub:
    """The relay side: every peer's app has one (`peer.server.make_app`; a peer behind NAT
    refuses to relay)."""

    def __init__(
        self,
        peer_id: str,
        traffic: Traffic,
        protocol: ProtocolConfig,
        max_request_bytes: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.peer_id, self.traffic, self.protocol = peer_id, traffic, protocol
        self.max_request_bytes = max_request_bytes
        self.max_answer_bytes = protocol.max_response_bytes
        self.answer_envelope_bytes = self.max_answer_bytes + 2**20  # /relay/answer's body
        self.clock = clock
        self.clients: dict[str, _Client] = {}
        self.closing = False

    async def close(self, app: object = None) -> None:
        """On the app's shutdown: end every poll and refuse every waiting request now (503),
        rather than hold the server's shutdown for a poll's or an answer's wait."""
        self.closing = True
        for client in self.clients.values():
            client.wakeup.set()
            for pending in client.pending.values():
                if not pending.answer.done():
                    pending.answer.set_exception(Unavailable("the relay is shutting down"))

    # ---- the peer behind NAT's side: /relay/poll, /relay/answer ----------------------

    async def poll(self, sender: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Hand `sender` its queued requests, waiting up to `wait_s` for one."""
        wait_s = payload.get("wait_s", 0.0)
        if not isinstance(wait_s, (int, float)) or isinstance(wait_s, bool):
            raise ProtocolError("wait_s must be a number")
        if not math.isfinite(wait_s) or wait_s < 0:
            raise ProtocolError("wait_s must be finite and not negative")
        wait_s = min(float(wait_s), self.protocol.relay_poll_s)
        self._expire()
        if self.closing:
            raise Unavailable("the relay is shutting down")
        client = self.clients.get(sender)
        if client is None:
            if len(self.clients) >= self.protocol.relay_max_clients:
                raise Unavailable(
                    f"this relay serves {len(self.clients)} peers already (--relay-max-clients)"
                )
            client = self.clients[sender] = _Client(self.clock())
            log.info("[%s] relaying for %s", self.peer_id, sender)
        client.polls += 1
        try:
            if not client.queue and wait_s > 0:
                client.wakeup.clear()
                try:
                    await asyncio.wait_for(client.wakeup.wait(), wait_s)
                except TimeoutError:
                    pass
                if self.closing:
                    raise Unavailable("the relay is shutting down")
            batch, size = [], 0
            while client.queue and len(batch) < self.protocol.relay_batch:
                if batch and size + len(client.queue[0].request.body) > self.max_request_bytes:
                    break  # one poll answer carries about one request body's limit
                pending = client.queue.popleft()
                batch.append(pending.request.to_wire())
                size += len(pending.request.body)
        finally:
            client.polls -= 1
            client.last_poll = self.clock()
        return {"requests": batch}

    def answer(self, sender: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Complete one of `sender`'s requests with its raw answer."""
        request_id = payload.get("id")
        if not isinstance(request_id, str):
            raise ProtocolError("id must be a string")
        client = self.clients.get(sender)
        pending = client.pending.get(request_id) if client is not None else None
        if pending is None:
            raise NotFound(f"no relayed request {show(request_id)} of yours waits for an answer")
        answer = RelayedAnswer.from_wire(payload, self.max_answer_bytes)
        if not pending.answer.done():
            pending.answer.set_result(answer)
        return {}

    # ---- the requesters' side: the raw route ------------------------------------------

    async def forward(
        self, peer_id: str, method: str, path: str, headers: Headers, body: bytes
    ) -> RelayedAnswer:
        """Queue a request for `peer_id` and wait for its answer (bounded)."""
        self._expire()
        client = None if self.closing else self.clients.get(peer_id)
        if client is None:
            raise Unavailable(f"{show(peer_id)} does not poll this relay")
        if len(client.pending) >= self.protocol.relay_max_pending:
            raise Unavailable(
                f"{len(client.pending)} requests for {show(peer_id)} wait already "
                "(--relay-max-pending)"
            )
        request = Relayed(secrets.token_hex(16), method, path, headers, body)
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        client.pending[request.id] = pending
        client.queue.append(pending)
        client.wakeup.set()
        self.traffic.received["relay"] += len(body)
        deadline = self.clock() + self.protocol.relay_timeout_s
        try:
            while not pending.answer.done():  # woken at least every relay_idle_s: _expire
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise Unavailable(
                        f"{show(peer_id)} did not answer within "
                        f"{self.protocol.relay_timeout_s:.0f} s"
                    )
                slice_s = min(remaining, self.protocol.relay_idle_s)
                await asyncio.wait([pending.answer], timeout=slice_s)
                self._expire()
            answer = pending.answer.result()  # Unavailable if its client stopped polling
        finally:  # answered, timed out, or its requester gone: out of the queue either way
            client.pending.pop(request.id, None)
            if pending in client.queue:
                client.queue.remove(pending)
        self.traffic.sent["relay"] += len(answer.body)
        return answer

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """`ANY /relay/{peer}/{tail}`: forward the request as it came (module doc)."""
        if request.method not in METHODS:
            raise web.HTTPMethodNotAllowed(request.method, METHODS)
        path = "/" + request.match_info["tail"]
        if not PATH.fullmatch(path):
            raise ProtocolError(f"relayed path {show(path)} is not one of ours")
        headers = relayed_headers(request.headers)
        body = await read_body(request, self.max_request_bytes)
        answer = await self.forward(request.match_info["peer"], request.method, path, headers, body)
        response = web.StreamResponse(
            status=answer.status, headers=CIMultiDict([*answer.headers, *RELAYED_SAFETY.items()])
        )
        return await write_stepped(request, response, answer.body)

    def _expire(self) -> None:
        """Drop clients that stopped polling; their waiting requesters get 503 now."""
        now = self.clock()
        for peer_id, client in list(self.clients.items()):
            if client.polls == 0 and now - client.last_poll > self.protocol.relay_idle_s:
                del self.clients[peer_id]
                log.info("[%s] %s stopped polling: no longer relayed here", self.peer_id, peer_id)
                for pending in client.pending.values():
                    if not pending.answer.done():
                        pending.answer.set_exception(
                            Unavailable(f"{show(peer_id)} stopped polling this relay")
                        )


async def read_body(request: web.Request, limit: int) -> bytes:
    """A request's body, at most `limit` bytes (PayloadTooLarge beyond): aiohttp's
    `read()` is bound by the app's client_max_size, which relayed answers may exceed."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    return b"".join(await read_capped(request.content, limit, "body"))
