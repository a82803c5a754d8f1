"""One row of the peer table (`PeerInfo`), as gossiped: its fields, their strict
validation (`PeerInfo.from_wire`: a malformed entry is a ProtocolError) and the bytes its
owner signs (`entry_bytes`: every field but the heartbeat and the signature)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack

from shoal.peer.errors import ProtocolError


@dataclass
class PeerInfo:
    """One row of the peer table, as gossiped."""

    peer_id: str
    address: str
    role: str = "replica"
    incarnation: float = 0.0
    heartbeat: int = 0
    first_round: int = 0  # the first outer round others should wait for this peer
    round: int = 0  # outer steps applied
    step: int = 0  # inner steps taken
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    weights_hash: str | None = None
    partner: str | None = None  # NoLoCo: the peer of the last exchange
    partner_distance: float | None = None  # NoLoCo: RMS(φ_self − φ_partner) at that exchange
    stage: int | None = None  # role "stage": the pipeline stage this peer serves
    activation: str | None = None  # role "stage": the activation codec of its pipeline replica
    grad_norm: float | None = (
        None  # the last inner step's gradient norm before clipping (CheckFree)
    )
    loop_lag_ms_max: float | None = None  # its event loop's worst lateness over the last 60 s
    devices: str | None = None  # what trains: "cpu", "cuda:0", "2 x cuda (FSDP2)" (--nproc)
    revision: int = 0  # the owner's count of content changes: orders two copies' content
    phase: str | None = None  # "ready": at the --min-peers start barrier; "training": past it
    pubkey: str | None = None  # the owner's Ed25519 public key, hex (`peer.identity`)
    sig: str | None = None  # the owner's signature of `entry_bytes(self)`, hex
    relayed_by: str | None = None  # behind NAT: its relays' ids, comma-separated (peer.relay)

    def version(self) -> tuple[float, int]:
        return (self.incarnation, self.heartbeat)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, obj: Any) -> PeerInfo:
        if not isinstance(obj, dict):
            raise ProtocolError("peer entry must be a map")
        unknown = set(obj) - _FIELD_NAMES
        if unknown:
            raise ProtocolError(f"unknown peer entry fields {sorted(map(str, unknown))[:3]}")
        kwargs = {}
        for f in fields(cls):
            if f.name not in obj:
                if f.name in ("peer_id", "address"):
                    raise ProtocolError(f"peer entry lacks {f.name}")
                continue
            kwargs[f.name] = _check_field(f.name, obj[f.name])
        return cls(**kwargs)


_FIELD_NAMES = {f.name for f in fields(PeerInfo)}
_STRINGS = {
    "peer_id": 128,
    "address": 256,
    "role": 32,
    "weights_hash": 128,
    "partner": 128,
    "activation": 64,
    "devices": 64,
    "phase": 16,
    "pubkey": 64,
    "sig": 128,
    "relayed_by": 2 * 128 + 1,
}
PHASES = ("ready", "training")
_INTS = {
    "heartbeat",
    "first_round",
    "round",
    "step",
    "bytes_sent",
    "bytes_received",
    "stage",
    "revision",
}
# refreshed before every heartbeat, not worth a revision each (`Membership.revise`): the
# traffic counters, revised at most every counters_every_s(), and what training moves all
# the time (a replica's round too: a stage's is read by CheckFree's recovery at once), at
# most every progress_every_s(); each revision costs every peer a full entry
COUNTER_FIELDS = ("bytes_sent", "bytes_received", "loop_lag_ms_max")
PROGRESS_FIELDS = (
    "step",
    "train_loss",
    "eval_loss",
    "tokens_per_s",
    "grad_norm",
    "weights_hash",
    "partner",
    "partner_distance",
)
CONTENT_FIELDS = tuple(
    f.name
    for f in fields(PeerInfo)
    if f.name not in {"heartbeat", "revision", "sig", *COUNTER_FIELDS, *PROGRESS_FIELDS}
)
_HEX = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")
_SIGNED = tuple(f.name for f in fields(PeerInfo) if f.name not in {"heartbeat", "sig"})
_FLOATS = {
    "incarnation",
    "train_loss",
    "eval_loss",
    "tokens_per_s",
    "partner_distance",
    "grad_norm",
    "loop_lag_ms_max",
}
_NULLABLE = {
    f.name for f in fields(PeerInfo) if f.default is None
}  # optional fields: None when unknown


def _check_field(name: str, value: Any) -> Any:
    if value is None and name in _NULLABLE:
        return None
    if name in _STRINGS:
        if not isinstance(value, str) or not 0 < len(value) <= _STRINGS[name]:
            raise ProtocolError(
                f"peer entry field {name} must be a non-empty string of at most "
                f"{_STRINGS[name]} chars"
            )
        if name == "address" and not value.startswith(("http://", "https://")):
            raise ProtocolError(f"peer address {value!r} must be an http(s) URL")
        if name == "phase" and value not in PHASES:
            raise ProtocolError(f"peer phase must be one of {PHASES}")
        if name in ("pubkey", "sig") and not _HEX.fullmatch(value):
            raise ProtocolError(f"peer entry field {name} must be {_STRINGS[name]} hex digits")
        return value
    if name in _INTS:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
            raise ProtocolError(f"peer entry field {name} must be a non-negative integer")
        return value
    if name in _FLOATS:
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise ProtocolError(f"peer entry field {name} must be a finite number")
        return float(value)
    raise ProtocolError(f"unknown peer entry field {name}")


def entry_bytes(info: PeerInfo) -> bytes:
    """What an entry's signature covers: canonical msgpack of [name, value] for every field
    but `heartbeat` and `sig`, numbers as `from_wire` reads them."""
    items = []
    for name in _SIGNED:
        value = getattr(info, name)
        if name in _FLOATS and value is not None:
            value = float(value)
        items.append([name, value])
    return msgpack.packb(items, use_bin_type=True)
