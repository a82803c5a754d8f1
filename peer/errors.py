"""Typed errors of the peer protocol, mapped to HTTP status codes in one place.

Handlers raise these; `peer.server`'s middleware turns them into responses and the
client (`peer.client`) turns non-2xx responses back into them, so both sides speak
the same vocabulary.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error that crosses the wire."""

    status = 500


class ProtocolError(ShoalError):
    """A message that is malformed, of the wrong version, or describes wrong shapes."""

    status = 400


class AuthError(ShoalError):
    """Missing or wrong HMAC, wrong swarm id, or a stale timestamp."""

    status = 401


class Forbidden(ShoalError):
    """An authenticated sender whose key is not on this run's --allow-peers list."""

    status = 403


class NotFound(ShoalError):
    """The thing asked for is not (or not yet) held by this peer."""

    status = 404


class ConfigMismatch(ShoalError):
    """A joiner's run config differs from the swarm's (model or optimizer settings)."""

    status = 409


class Gone(ShoalError):
    """A state snapshot that was replaced while a joiner downloaded it."""

    status = 410


class PayloadTooLarge(ShoalError):
    """A body above the configured maximum size."""

    status = 413


class Unavailable(ShoalError):
    """A relay that cannot take a request now: the peer behind it is not polling, its
    queue is full, or the relay has no room for another client (`peer.relay`)."""

    status = 503


_BY_STATUS = {
    cls.status: cls
    for cls in (
        ProtocolError,
        AuthError,
        Forbidden,
        NotFound,
        ConfigMismatch,
        Gone,
        PayloadTooLarge,
        Unavailable,
    )
}


def error_for_status(status: int, message: str) -> ShoalError:
    """The typed error a client raises for a non-2xx response."""
    return _BY_STATUS.get(status, ShoalError)(f"HTTP {status}: {message}")


class Stopped(Exception):
    """Raised inside the training thread when the peer is stopping (not a protocol error)."""
