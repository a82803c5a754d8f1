"""The outgoing half of the transport: authenticated msgpack requests with bounded waits.

Every call has a timeout; a response is read up to a size cap and its envelope (MAC,
swarm id, version) is checked like a request's. Non-2xx answers come back as the typed
errors of `peer.errors`; network failures as `PeerUnreachable`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import aiohttp

from shoal.peer.errors import PayloadTooLarge, ShoalError, error_for_status
from shoal.peer.wire import NO_SWARM, Envelope, WireCodec


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
    def __init__(self, wire: WireCodec, traffic: Traffic, *, request_timeout_s: float, max_response_bytes: int) -> None:
        self.wire = wire
        self.traffic = traffic
        self.request_timeout_s = request_timeout_s
        self.max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), auto_decompress=False)

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
        body, headers = self.wire.encode(method, path, payload or {}, swarm_id=NO_SWARM if joining else None)
        limit = max_response_bytes or self.max_response_bytes
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        kind = Traffic.kind(path)
        try:
            async with self._session.request(method, address.rstrip("/") + path, data=body, headers=headers, timeout=timeout) as resp:
                self.traffic.sent[kind] += len(body)
                declared = resp.content_length
                if declared is not None and declared > limit:
                    raise PayloadTooLarge(f"{address}{path}: response of {declared} bytes exceeds {limit}")
                chunks, size = [], 0
                async for chunk in resp.content.iter_chunked(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"{address}{path}: response exceeds {limit} bytes")
                    chunks.append(chunk)
                data = b"".join(chunks)
                self.traffic.received[kind] += len(data)
                if resp.status >= 300:
                    raise error_for_status(resp.status, data[:500].decode("utf-8", "replace"))
                return self.wire.decode("RESPONSE", response_path(path), resp.headers, data, any_swarm=joining, max_bytes=limit)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise PeerUnreachable(f"{address}{path}: {type(exc).__name__}: {exc}") from None
