"""Wire format: msgpack bodies, an authenticated envelope in headers, tensors as raw bytes.

Every request and every response between peers is one msgpack map (never pickle). The
envelope travels in HTTP headers so the body stays a plain map: version, swarm id, sender,
time, nonce, encoding and MAC, each parsed strictly before use (`peer.envelope` lists the
headers and their shapes). The MAC is an HMAC-SHA256, keyed by the swarm secret, over the
method, the path, the other envelope fields and the body's SHA-256 (only when a secret is
set). Every envelope also carries its sender's public key and Ed25519 signature over the
same bytes, checked last, against the key bound to the sender's id (`peer.keybook`; the
identities: `peer.identity`). A time further than `max_clock_skew_s` off our clock is an
AuthError; within that window the server's replay cache (`peer.replay`) accepts each
request's nonce once. An answer echoes its request's nonce under its MAC and binds its
status through `response_path`: a recorded answer cannot be served for another request,
nor an error status changed.

Binding the method and path into the MAC means a body signed for one endpoint cannot be
replayed against another. The MAC covers the body through its SHA-256 digest so that a
body is packed, compressed and hashed once (`prepare`, off the event loop for anything
large) and then served to any number of fetchers with only a header MAC computed per
answer (`headers`): a round's contribution is encoded once, not once per fetcher.

Tensors are maps {"dtype", "shape", "data"} with little-endian raw bytes; `unpack_tensor`
checks the dtype against an allow-list and the byte count against the shape (and the shape
against the expected one) before touching the data.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from shoal.compression import CodecError, FrameTooLarge, zstd_frame_parts, zstd_unframe
from shoal.peer.envelope import (  # noqa: F401 - re-exported
    H_KEY,
    H_MAC,
    H_SIG,
    H_TIME,
    H_VERSION,
    NO_SWARM,
    PROTOCOL_VERSION,
    SIGNED,
    Fields,
    mac,
    new_nonce,
    parse_fields,
    show,
    signed_bytes,
)
from shoal.peer.errors import AuthError, PayloadTooLarge, ProtocolError
from shoal.peer.identity import Identity
from shoal.peer.keybook import KeyBook
from shoal.peer.msgpack_large import unpack_large

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Envelope:
    """A decoded, authenticated message."""

    sender: str
    swarm_id: str
    timestamp: float
    payload: dict[str, Any]
    nonce: str = ""
    key: str = ""  # the sender's public key, hex (verified: it signed this message)


@dataclass(frozen=True)
class PreparedBody:
    """A message body ready to send: packed, maybe compressed, and its SHA-256 (what the
    MAC covers). Immutable, so one can answer many requests."""

    data: bytes
    encoding: str  # "zstd" or "identity"
    digest: bytes  # sha256(data)


class WireCodec:
    """Encodes and authenticates messages for one peer (its id, swarm id and secret, its
    identity: made in memory when not given; `allowed`: the --allow-peers keys)."""

    def __init__(
        self,
        peer_id: str,
        swarm_id: str,
        swarm_key: str | None,
        *,
        max_body_bytes: int,
        compress_above_bytes: int = 64 * 1024,
        max_clock_skew_s: float = 300.0,
        identity: Identity | None = None,
        allowed: frozenset[bytes] | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.identity = identity or Identity.generate()
        self.keybook = KeyBook(peer_id, allowed)
        self.swarm_id = swarm_id
        self.key = swarm_key.encode() if swarm_key else None
        self.max_body_bytes = max_body_bytes
        self.compress_above_bytes = compress_above_bytes
        self.max_clock_skew_s = max_clock_skew_s

    def prepare(self, payload: Mapping[str, Any]) -> PreparedBody:
        """Pack `payload`, compress it if large, hash it (work proportional to its size:
        call it off the event loop when `is_large(payload)`). A large payload is packed
        as a list of parts, its big binary values left where they are, and compressed a
        megabyte at a time: an executor thread never holds the interpreter for long, which
        would stall the event loop as surely as running on it."""
        if not self.is_large(payload):
            raw = msgpack.packb(dict(payload), use_bin_type=True)
            return PreparedBody(raw, "identity", hashlib.sha256(raw).digest())
        parts = pack_parts(dict(payload), self.compress_above_bytes)
        framed = zstd_frame_parts(parts, min_size=self.compress_above_bytes)
        if framed[0] == 1:  # the framing compressed it
            body, encoding = framed, "zstd"
        else:
            body, encoding = framed[1:], "identity"
        return PreparedBody(body, encoding, hashlib.sha256(body).digest())

    def headers(
        self,
        method: str,
        path: str,
        body: PreparedBody,
        *,
        swarm_id: str | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        """The envelope headers for sending `body` as `method path` now (cheap: the MAC
        covers the body's digest). `nonce`: an answer's is its request's; None, a fresh one."""
        fields = [
            str(PROTOCOL_VERSION),
            swarm_id or self.swarm_id,
            self.peer_id,
            f"{time.time():.3f}",
            nonce or new_nonce(),
            body.encoding,
            self.identity.public_hex,
        ]
        headers = dict(zip(SIGNED, fields, strict=True))
        if self.key is not None:
            headers[H_MAC] = mac(self.key, method, path, fields, body.digest)
        signature = self.identity.sign(signed_bytes(method, path, fields, body.digest))
        headers[H_SIG] = signature.hex()
        return headers

    def encode(
        self, method: str, path: str, payload: Mapping[str, Any], *, swarm_id: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """Serialise `payload` and build the envelope headers for `method path`."""
        body = self.prepare(payload)
        return body.data, self.headers(method, path, body, swarm_id=swarm_id)

    def is_large(self, payload: Any) -> bool:
        """Whether packing `payload` is byte work for an executor (house rule: anything over
        `compress_above_bytes`)."""
        return payload_nbytes(payload, self.compress_above_bytes) >= self.compress_above_bytes

    def seal(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, str]:
        """The MAC (with a swarm key) and signature headers for `body` under the envelope
        fields in `headers` (for tests that send bodies or fields of their own)."""
        fields = [headers[h] for h in SIGNED]
        data = signed_bytes(method, path, fields, hashlib.sha256(body).digest())
        sealed = {H_SIG: self.identity.sign(data).hex()}
        if self.key is not None:
            sealed[H_MAC] = hmac.new(self.key, data, hashlib.sha256).hexdigest()
        return sealed

    def verify(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | Fields,
        digest: bytes,
        *,
        any_swarm: bool = False,
        expect_nonce: str | None = None,
    ) -> Fields:
        """Parse and authenticate an envelope whose body has SHA-256 `digest`: its fields
        (ProtocolError when malformed or of another version, AuthError when the MAC, swarm,
        time, for an answer the echoed `expect_nonce`, or the sender's signature or key is
        wrong; Forbidden for a key not on the allow-list).

        `any_swarm` skips the swarm-id check: for a join, where one side does not know the
        swarm id yet (the MAC still proves the other side holds the swarm key)."""
        fields = headers if isinstance(headers, Fields) else parse_fields(headers)
        if self.key is not None:
            expected = mac(self.key, method, path, fields.signed, digest)
            if fields.mac is None or not hmac.compare_digest(fields.mac, expected):
                raise AuthError("bad or missing HMAC: wrong swarm key?")
        if fields.swarm_id != self.swarm_id and not any_swarm:
            raise AuthError(
                f"message for swarm {show(fields.swarm_id)}, this is swarm {show(self.swarm_id)}"
            )
        if not abs(time.time() - fields.timestamp) <= self.max_clock_skew_s:
            raise AuthError(
                f"timestamp off by more than {self.max_clock_skew_s:.0f} s (clock skew or replay)"
            )
        if expect_nonce is not None and fields.nonce != expect_nonce:
            raise AuthError("answer bound to another request (its nonce is not ours)")
        self.keybook.check_envelope(method, path, fields, digest)
        return fields

    def open(self, fields: Fields, body: bytes, max_bytes: int | None = None) -> Envelope:
        """The message of an authenticated envelope: its body unframed and unpacked."""
        limit = self.max_body_bytes if max_bytes is None else max_bytes
        if fields.encoding == "zstd":
            try:
                raw = zstd_unframe(body, max_size=limit)
            except FrameTooLarge as exc:
                raise PayloadTooLarge(f"zstd body exceeds the limit: {exc}") from None
            except CodecError as exc:
                raise ProtocolError(f"bad zstd body: {exc}") from None
        else:
            raw = body
        return Envelope(
            sender=fields.sender,
            swarm_id=fields.swarm_id,
            timestamp=fields.timestamp,
            payload=unpack_map(raw, self.compress_above_bytes),
            nonce=fields.nonce,
            key=fields.key or "",
        )

    def decode(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | Fields,
        body: bytes,
        *,
        any_swarm: bool = False,
        max_bytes: int | None = None,
        expect_nonce: str | None = None,
    ) -> Envelope:
        """Authenticate and parse a message (`verify`, then `open`); raise AuthError,
        ProtocolError or PayloadTooLarge. It does not consult a replay cache: the server
        does, between this and acting on the message."""
        limit = self.max_body_bytes if max_bytes is None else max_bytes
        if len(body) > limit:
            raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the limit of {limit}")
        fields = self.verify(
            method,
            path,
            headers,
            hashlib.sha256(body).digest(),
            any_swarm=any_swarm,
            expect_nonce=expect_nonce,
        )
        return self.open(fields, body, limit)


def pack_parts(obj: Any, big_bytes: int) -> list[Any]:
    """msgpack of `obj` as a list of parts whose concatenation is `msgpack.packb(obj,
    use_bin_type=True)`: binary values of `big_bytes` or more are parts of their own (not
    copied), everything else is packed in small pieces."""
    packer, parts, stack = msgpack.Packer(use_bin_type=True), [], [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            parts.append(packer.pack_map_header(len(item)))
            for key, value in reversed(list(item.items())):
                stack.extend((value, _Packed(packer.pack(key))))
        elif isinstance(item, (list, tuple)):
            parts.append(packer.pack_array_header(len(item)))
            stack.extend(reversed(item))
        elif isinstance(item, _Packed):
            parts.append(item.data)
        elif isinstance(item, (bytes, bytearray, memoryview)) and len(item) >= big_bytes:
            parts.append(_bin_header(len(item)))
            parts.append(item)
        else:
            parts.append(packer.pack(item))
    return parts


def _bin_header(size: int) -> bytes:
    """msgpack's bin 8/16/32 header for `size` bytes."""
    if size < 1 << 8:
        return b"\xc4" + size.to_bytes(1, "big")
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


@dataclass(frozen=True)
class _Packed:
    data: bytes


def payload_nbytes(obj: Any, stop_at: int) -> int:
    """Bytes of the binary and text values in `obj` (maps and lists walked), counting up to
    `stop_at`: a cheap estimate of its packed size for small control messages."""
    total, stack = 0, [obj]
    while stack and total < stop_at:
        item = stack.pop()
        if isinstance(item, (bytes, bytearray, memoryview, str)):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
            total += 8 * len(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
            total += 8
        else:
            total += 8
    return total


def unpack_map(raw: bytes, large_bytes: int = 64 * 1024) -> dict[str, Any]:
    """msgpack-decode a body that must be a map with string keys (one of `large_bytes` or
    more a value at a time: `peer.msgpack_large`)."""
    try:
        if len(raw) >= large_bytes:
            payload = unpack_large(raw)
        else:
            payload = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"body is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"body must be a msgpack map, got {type(payload).__name__}")
    return payload


def pack_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as a msgpack-able map of dtype, shape and little-endian bytes."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {tensor.dtype} cannot be sent")
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the raw 16-bit words
        data = tensor.view(torch.int16).numpy().astype("<i2").tobytes()
    else:
        data = tensor.numpy().astype(tensor.numpy().dtype.newbyteorder("<")).tobytes()
    return {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data": data}


def unpack_tensor(obj: Any, expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Validate and rebuild a tensor map; raise ProtocolError on anything inconsistent."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise ProtocolError("tensor must be a map with exactly dtype, shape, data")
    dtype_name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype_name not in _DTYPES:
        raise ProtocolError(f"unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**40 for d in shape):
        raise ProtocolError(f"bad shape {shape!r}")
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise ProtocolError(
            f"shape {tuple(shape)} does not match the expected {tuple(expected_shape)}"
        )
    if not isinstance(data, bytes):
        raise ProtocolError("tensor data must be bytes")
    dtype = _DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(data) != numel * itemsize:
        raise ProtocolError(f"{len(data)} data bytes for shape {tuple(shape)} of {dtype_name}")
    if dtype == torch.bfloat16:
        array = np.frombuffer(data, dtype="<i2").copy()
        return torch.from_numpy(array).view(torch.bfloat16).reshape(shape)
    array = np.frombuffer(data, dtype=np.dtype(dtype_name).newbyteorder("<")).astype(dtype_name)
    return torch.from_numpy(array.copy()).reshape(shape)
