"""The outgoing half of the transport: authenticated msgpack requests with bounded waits.

Every call has a timeout; a response is read up to a size cap and its envelope (MAC,
swarm id, version) is checked like a request's. Non-2xx answers come back as the typed
errors of `peer.errors`; network failures as `PeerUnreachable`. The event loop only waits:
packing a large request and joining, hashing and unpacking a large response run in the
default executor (`off_loop`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp

from shoal.peer.errors import PayloadTooLarge, ShoalError, error_for_status
from shoal.peer.wire import NO_SWARM, Envelope, PreparedBody, WireCodec

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
    gossip, chunk, ...), so pseudo-gradient traffic can be told from control traffic."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()

    @staticmethod
    def kind(path: str) -> str:
        return path.rstrip("/").rsplit("/", 1)[-1] or "root"

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())


def response_path(path: str) -> str:
    """What a response's MAC binds to: the request path, marked as an answer."""
    return "response:" + path


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
        body = prepared.data
        limit = max_response_bytes or self.max_response_bytes
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        kind = Traffic.kind(path)
        try:
            async with self._session.request(
                method, address.rstrip("/") + path, data=body, headers=headers, timeout=timeout
            ) as resp:
                self.traffic.sent[kind] += len(body)
                declared = resp.content_length
                if declared is not None and declared > limit:
                    raise PayloadTooLarge(
                        f"{address}{path}: response of {declared} bytes exceeds {limit}"
                    )
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"{address}{path}: response exceeds {limit} bytes")
                    chunks.append(chunk)
                self.traffic.received[kind] += size
                if resp.status >= 300:
                    message = b"".join(chunks)[:500].decode("utf-8", "replace")
                    raise error_for_status(resp.status, message)
                large = size >= self.wire.compress_above_bytes
                return await off_loop(large, self._open, path, resp.headers, chunks, joining, limit)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerUnreachable(f"{address}{path}: {type(exc).__name__}: {exc}") from None

    def _open(
        self, path: str, headers: Mapping[str, str], chunks: list[bytes], joining: bool, limit: int
    ) -> Envelope:
        data = b"".join(chunks)
        return self.wire.decode(
            "RESPONSE", response_path(path), headers, data, any_swarm=joining, max_bytes=limit
        )
