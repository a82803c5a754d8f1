"""HTTP bodies a step at a time, both ways: read with a cap that a declared length cannot
lift, and written a megabyte at a time. Shared by the client (`peer.client`), the server
(`peer.server`) and the NAT relay and tunnel (`peer.relay`, `peer.tunnel`)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from shoal.peer.errors import PayloadTooLarge

STEP_BYTES = 1 << 20  # larger bodies are read and written a megabyte at a time


async def read_capped(stream: aiohttp.StreamReader, limit: int, what: str) -> list[bytes]:
    """`stream`'s body in chunks of up to `STEP_BYTES`; PayloadTooLarge (naming `what`) as
    soon as it passes `limit` bytes (a declared length is not trusted)."""
    chunks, size = [], 0
    async for chunk in stream.iter_chunked(STEP_BYTES):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} exceeds {limit} bytes")
        chunks.append(chunk)
    return chunks


async def write_stepped(
    request: web.Request, response: web.StreamResponse, body: bytes
) -> web.StreamResponse:
    """Send `body` as `response` a step at a time, waiting for the socket between steps:
    handed to the transport whole, it would be copied into the transport's buffer in one
    go."""
    response.content_length = len(body)
    await response.prepare(request)
    view = memoryview(body)
    for start in range(0, len(view), STEP_BYTES):
        await response.write(view[start : start + STEP_BYTES])
    await response.write_eof()
    return response
