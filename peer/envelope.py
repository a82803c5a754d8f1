"""The envelope's header fields: parsed strictly before any use, and the MAC over them.

Header values come from anyone who can open a socket, so nothing reads one before it is
known to be ASCII, short and of its field's shape: a value with non-ASCII or non-UTF-8
bytes (which aiohttp hands over as surrogates), a time of `nan`, `inf` or `1e308`, a MAC
or nonce of the wrong length, a header given twice, is a `ProtocolError` (400) here, not a
TypeError or UnicodeEncodeError (500) wherever it would first be used. The shapes:

    X-Shoal-Version   1-4 digits; a version other than ours is a `VersionMismatch` (400),
                      checked first so that peers of different versions get that error and
                      not a confusing HMAC failure (the MAC's layout changes with versions)
    X-Shoal-Swarm     1-128 of [A-Za-z0-9._~:@+-]
    X-Shoal-Peer      1-128 of [A-Za-z0-9._~:@+-]
    X-Shoal-Time      unix seconds: 1-11 digits, optionally a point and 1-9 digits (no sign,
                      no exponent: every value is finite and in 0..1e11)
    X-Shoal-Nonce     32 lowercase hex digits (16 random bytes); a request's is fresh, an
                      answer's echoes the request's (binding the answer to that request)
    X-Shoal-Encoding  "zstd" or "identity"
    X-Shoal-MAC       64 lowercase hex digits (HMAC-SHA256); absent without a swarm key
    X-Shoal-Key       64 lowercase hex digits: the sender's Ed25519 public key (under the
                      MAC: without the swarm key, no one on the path can swap in another)
    X-Shoal-Sig       128 lowercase hex digits: the sender's Ed25519 signature of the bytes
                      the MAC covers (`signed_bytes`), checked against X-Shoal-Key, whose
                      binding to X-Shoal-Peer `peer.keybook` checks (`peer.identity`)

The MAC covers the method, the path (for answers `response_path`, which names the status
too), every field above but the MAC and the signature (`SIGNED`, in that order), and the
body's SHA-256; the signature covers the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shoal.peer.errors import ProtocolError

# 3: a nonce in every envelope, answers echo the request's and sign their status
# 4: every envelope carries its sender's public key and Ed25519 signature
PROTOCOL_VERSION = 4
H_VERSION, H_SWARM, H_PEER, H_TIME = (
    "X-Shoal-Version",
    "X-Shoal-Swarm",
    "X-Shoal-Peer",
    "X-Shoal-Time",
)
H_NONCE, H_ENCODING, H_MAC = "X-Shoal-Nonce", "X-Shoal-Encoding", "X-Shoal-MAC"
H_KEY, H_SIG = "X-Shoal-Key", "X-Shoal-Sig"
SIGNED = (H_VERSION, H_SWARM, H_PEER, H_TIME, H_NONCE, H_ENCODING, H_KEY)  # in MAC order
NO_SWARM = "-"
NONCE_BYTES = 16
MAX_ID_CHARS = 128
ID_PATTERN = re.compile(r"[A-Za-z0-9._~:@+-]{1,128}")
_SHAPES = {
    H_VERSION: re.compile(r"[0-9]{1,4}"),
    H_SWARM: ID_PATTERN,
    H_PEER: ID_PATTERN,
    H_TIME: re.compile(r"[0-9]{1,11}(?:\.[0-9]{1,9})?"),
    H_NONCE: re.compile(r"[0-9a-f]{32}"),  # 2 * NONCE_BYTES
    H_ENCODING: re.compile(r"zstd|identity"),
    H_MAC: re.compile(r"[0-9a-f]{64}"),
    H_KEY: re.compile(r"[0-9a-f]{64}"),  # 32 bytes
    H_SIG: re.compile(r"[0-9a-f]{128}"),  # 64 bytes
}
_MAX_CHARS = 2 * MAX_ID_CHARS  # longer than any valid field: refused before any regex


class VersionMismatch(ProtocolError):
    """The other side speaks another protocol version (told apart so that a client can
    report it as such rather than as an unauthenticated answer)."""


@dataclass(frozen=True)
class Fields:
    """The envelope of one message, every field of the right shape (not yet authenticated).
    `signed` holds the header strings exactly as sent, in MAC order."""

    version: int
    swarm_id: str
    sender: str
    timestamp: float
    nonce: str
    encoding: str
    mac: str | None
    signed: tuple[str, ...]
    key: str | None = None
    sig: str | None = None


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def response_path(path: str, status: int = 200) -> str:
    """What an answer's MAC binds to besides the request's nonce: the request path and the
    answer's status (so a signed 404 cannot be passed off as a 409 or a 200)."""
    return f"response {status}:{path}"


def signed_bytes(method: str, path: str, fields: Sequence[str], digest: bytes) -> bytes:
    """What the MAC and the sender's signature cover (`digest`: the body's SHA-256)."""
    return "\n".join([method.upper(), path, *fields]).encode() + b"\n" + digest


def mac(key: bytes, method: str, path: str, fields: Sequence[str], digest: bytes) -> str:
    return hmac.new(key, signed_bytes(method, path, fields, digest), hashlib.sha256).hexdigest()


def show(value: object, limit: int = 40) -> str:
    """A received value for an error message or a log line: bounded, escaped to ASCII."""
    text = value if isinstance(value, str) else repr(value)
    return ascii(text[:limit]) + ("…" if len(text) > limit else "")


def header(headers: Mapping[str, str], name: str, *, required: bool = True) -> str | None:
    """The one value of envelope header `name`, checked for its shape (ProtocolError when
    missing, repeated or malformed; None when missing and not `required`)."""
    getall = getattr(headers, "getall", None)  # aiohttp's multidicts keep repeated headers
    if getall is not None:
        values = getall(name, [])
    else:
        values = [headers[name]] if name in headers else []
    if len(values) > 1:
        raise ProtocolError(f"envelope header {name} given {len(values)} times")
    if not values:
        if required:
            raise ProtocolError(f"missing envelope header {name}")
        return None
    value = values[0]
    if (
        not isinstance(value, str)
        or len(value) > _MAX_CHARS
        or not value.isascii()
        or not _SHAPES[name].fullmatch(value)
    ):
        raise ProtocolError(f"malformed envelope header {name}: {show(value)}")
    return value


def parse_fields(headers: Mapping[str, str]) -> Fields:
    """Every envelope field of `headers`, parsed strictly; the version first (see above)."""
    version = int(header(headers, H_VERSION) or "0")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version {version}, this peer speaks {PROTOCOL_VERSION}")
    signed = tuple(header(headers, name) or "" for name in SIGNED)
    _, swarm_id, sender, stamp, nonce, encoding, key = signed
    return Fields(
        version=version,
        swarm_id=swarm_id,
        sender=sender,
        timestamp=float(stamp),
        nonce=nonce,
        encoding=encoding,
        mac=header(headers, H_MAC, required=False),
        signed=signed,
        key=key,
        sig=header(headers, H_SIG, required=False),
    )
