"""The outgoing half of the transport: authenticated msgpack requests with bounded waits.

Every call has a timeout; a response is read up to a size cap and its envelope (MAC,
swarm id, version, and the echo of our request's nonce) is checked like a request's, error
answers included. Authenticated non-2xx answers come back as the typed errors of
`peer.errors`; network failures as `PeerUnreachable`, and so does an answer, 2xx or not,
that fails authentication: one we cannot attribute to the peer counts as no answer, so
the caller's retries and deadlines apply and a forger on the path can do no more than
drop packets (a wrong --swarm-key shows as "unauthenticated HTTP 401 answer"). An answer
of another protocol version is a `VersionMismatch`: retrying cannot help, and its message
names both versions. The event loop only waits:
packing a large request and joining, hashing and unpacking a large response run in the
default executor (`off_loop`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from shoal.peer.bodies import read_capped
from shoal.peer.envelope import H_NONCE, NO_SWARM, Fields, VersionMismatch, response_path
from shoal.peer.errors import PayloadTooLarge, ShoalError, error_for_status
from shoal.peer.wire import Envelope, PreparedBody, WireCodec

T = TypeVar("T")


async def off_loop(large: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, in the default executor when `large` (byte work proportional to a
    body's size), else inline: an executor hop costs more than a small message's work."""
    if not large:
        return fn(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: fn(*args, **kwargs))


class PeerUnreachable(ShoalError):
    """Connection refused, reset or timed out."""


class Traffic:
    """Body bytes this peer sent and received, by kind (last path segment: contribution,
    gossip, chunk, ...; "relay" for everything a relay forwards, `peer.relay`), so
    pseudo-gradient traffic can be told from control traffic."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()

    @staticmethod
    def kind(path: str) -> str:
        if path.startswith("/relay/"):
            return "relay"
        return path.rstrip("/").rsplit("/", 1)[-1] or "root"

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())


class PeerClient:
    def __init__(
        self,
        wire: WireCodec,
        traffic: Traffic,
        *,
        request_timeout_s: float,
        max_response_bytes: int,
    ) -> None:
        self.wire = wire
        self.traffic = traffic
        self.request_timeout_s = request_timeout_s
        self.max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        address: str,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        max_response_bytes: int | None = None,
        joining: bool = False,
    ) -> Envelope:
        """Send one request and return the verified response envelope.

        `joining`: we do not know the swarm id yet; send NO_SWARM and accept the answer's."""
        assert self._session is not None, "client not started"
        payload = payload or {}
        prepared: PreparedBody = await off_loop(
            self.wire.is_large(payload), self.wire.prepare, payload
        )
        headers = self.wire.headers(method, path, prepared, swarm_id=NO_SWARM if joining else None)
        nonce, body = headers[H_NONCE], prepared.data
        limit = max_response_bytes or self.max_response_bytes
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        kind = Traffic.kind(path)
        try:
            async with self._session.request(
                method,
                address.rstrip("/") + path,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,  # a redirect could pass another peer's answer off as its own
            ) as resp:
                self.traffic.sent[kind] += len(body)
                declared = resp.content_length
                if declared is not None and declared > limit:
                    raise PayloadTooLarge(
                        f"{address}{path}: response of {declared} bytes exceeds {limit}"
                    )
                chunks = await read_capped(resp.content, limit, f"{address}{path}: response")
                size = sum(map(len, chunks))
                self.traffic.received[kind] += size
                answer = _Answer(address, path, resp.status, resp.headers, nonce, joining)
                if resp.status >= 300:
                    data = b"".join(chunks)
                    self._authenticate(answer, data)
                    raise error_for_status(resp.status, data[:500].decode("utf-8", "replace"))
                large = size >= self.wire.compress_above_bytes
                return await off_loop(large, self._open, answer, chunks, limit)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerUnreachable(f"{address}{path}: {type(exc).__name__}: {exc}") from None

    def _authenticate(self, answer: _Answer, data: bytes) -> Fields:
        """The answer's envelope, checked against our request; see the module doc for why
        a failure is PeerUnreachable."""
        where = answer.address + answer.path
        try:
            return self.wire.verify(
                "RESPONSE",
                response_path(answer.path, answer.status),
                answer.headers,
                hashlib.sha256(data).digest(),
                any_swarm=answer.joining,
                expect_nonce=answer.nonce,
            )
        except VersionMismatch as exc:
            raise VersionMismatch(f"{where}: answered in {exc}") from None
        except ShoalError as exc:  # AuthError, or a malformed envelope (ProtocolError)
            raise PeerUnreachable(
                f"{where}: unauthenticated HTTP {answer.status} answer: {exc}"
            ) from None

    def _open(self, answer: _Answer, chunks: list[bytes], limit: int) -> Envelope:
        data = b"".join(chunks)
        return self.wire.open(self._authenticate(answer, data), data, limit)


@dataclass(frozen=True)
class _Answer:
    """What an answer must be checked against: where it came from and our request's nonce."""

    address: str
    path: str
    status: int
    headers: Mapping[str, str]
    nonce: str
    joining: bool
