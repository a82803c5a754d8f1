"""Membership: the peer table, spread by gossip, with heartbeat-based failure detection.

Protocol (SWIM-flavoured, no coordinator; the messages are `peer.gossip`'s):
- Every `heartbeat_interval_s` a peer bumps its own heartbeat counter and swaps digests
  (peer id -> incarnation, heartbeat, revision) with `gossip_fanout` random live peers;
  full entries travel only where a digest shows the other side lacks them or holds an
  older revision, heartbeats alone travel as bare counters.
- An entry has two versions. Its heartbeat (incarnation, heartbeat) says the owner is alive;
  its revision (incarnation, revision) orders its content: the owner bumps `revision` when
  anything but the heartbeat and the traffic counters changed, and for the counters alone at
  most every `counters_every_s()`, so a heartbeat never costs a full entry. Incarnation is
  the owner's start time, so a restarted peer with the same id supersedes its old self.
- Liveness is judged locally: a peer whose heartbeat has not grown for `suspect_after_s` is
  suspect (still waited for), after `dead_after_s` it is dead (left out of rounds and
  gossip, shown as dead on the dashboard), after `forget_after_s` it is dropped.
- Dead is not final: every interval a peer also probes one random dead (not yet forgotten)
  peer, off the heartbeat path. Otherwise peers that all stalled at once (heavy CPU, a
  paused VM) would each mark the others dead and gossip to nobody, forever; a probe that
  gets an answer revives both sides through the usual newer-heartbeat merge.
Entries from the network are validated field by field; a malformed table is rejected
whole (ProtocolError) and changes nothing.
- An entry carries its owner's public key and signature over `entry_bytes` (all but the
  heartbeat, which travels bare in digests), so a relayer cannot alter another's entry;
  one that fails `check` (`peer.keybook`) is dropped, not merged.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import msgpack

from shoal.peer.errors import ProtocolError
from shoal.peer.identity import Identity

MAX_ENTRIES = 4096
MAX_HISTORY_ROUNDS = 1000
COUNTERS_EVERY_S = 10.0


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
# refreshed before every heartbeat; not worth a revision each (see Membership.revise)
_COUNTERS = ("bytes_sent", "bytes_received", "loop_lag_ms_max")
_CONTENT = tuple(
    f.name for f in fields(PeerInfo) if f.name not in {"heartbeat", "revision", "sig", *_COUNTERS}
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


class Membership:
    """The local view of the swarm. Not thread-safe: used from the event loop only.
    `signer` signs our entry; `check` (None: take all, as simulations do) vets others'."""

    def __init__(
        self,
        me: PeerInfo,
        *,
        suspect_after_s: float = 3.0,
        dead_after_s: float = 6.0,
        forget_after_s: float = 600.0,
        clock=time.monotonic,
        signer: Identity | None = None,
        check: Callable[[PeerInfo], bool] | None = None,
    ) -> None:
        self.me = me
        self.signer, self.check = signer, check
        if signer is not None:
            me.pubkey = signer.public_hex
        self._signed: bytes | None = None
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        self.forget_after_s = forget_after_s
        self.clock = clock
        self.peers: dict[str, PeerInfo] = {me.peer_id: me}
        self.last_change: dict[str, float] = {me.peer_id: clock()}
        self.history: dict[str, dict[int, dict[str, float | None]]] = {}
        self._content = self._counters = None
        self._revised_at = -math.inf
        self.revise()
        self._record_history(me)

    def beat(self) -> None:
        """Advance our own heartbeat (once per interval), with a new revision if our entry's
        content changed."""
        self.revise()
        self.me.heartbeat += 1
        self.last_change[self.me.peer_id] = self.clock()
        self._record_history(self.me)

    def revise(self) -> None:
        """Bump our revision if our content changed since the last one, or only the traffic
        counters did and the last revision is `counters_every_s()` old: every revision costs
        each peer one full entry, so counters alone may cost the swarm only so many."""
        content = tuple(getattr(self.me, name) for name in _CONTENT)
        counters = tuple(getattr(self.me, name) for name in _COUNTERS)
        now = self.clock()
        if content != self._content or (
            counters != self._counters and now - self._revised_at >= self.counters_every_s()
        ):
            if self._content is not None:
                self.me.revision += 1
            self._content, self._counters, self._revised_at = content, counters, now

    def counters_every_s(self) -> float:
        """Least seconds between revisions for the traffic counters alone: 10 s, and 0.1 s
        more per peer known, so that the full entries they cause stay under 10 per second
        per peer whatever the swarm's size (the dashboard's counters lag more in big ones)."""
        return max(COUNTERS_EVERY_S, 0.1 * len(self.peers))

    def merge(self, entries: Any) -> int:
        """Merge full entries (a table, or a gossip message's); returns how many were news.
        All-or-nothing: every entry is validated before any is taken."""
        if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
            raise ProtocolError(f"peer table must be a list of at most {MAX_ENTRIES} entries")
        return self.take([PeerInfo.from_wire(e) for e in entries])

    def take(self, parsed: list[PeerInfo]) -> int:
        """Merge entries already validated (`PeerInfo.from_wire`); returns how many were news.

        A newer incarnation replaces the entry. Within one incarnation the content is taken
        when its (revision, heartbeat) is larger, and the heartbeat is always the larger of
        the two: heartbeats also travel alone (digests), so a copy may bring a newer
        revision with an older heartbeat, or an older revision with a newer one. Neither
        moves the heartbeat back, and an older revision never replaces newer content."""
        news = 0
        now = self.clock()
        for info in parsed:
            if info.peer_id == self.me.peer_id:
                continue  # only we speak for ourselves
            if self.check is not None and not self.check(info):
                continue  # forged, unsigned or from a key not allowed: never merged
            known = self.peers.get(info.peer_id)
            if known is None or info.incarnation > known.incarnation:
                self._replace(info, now, alive=True)
                news += 1
            elif info.incarnation == known.incarnation:
                fresher = info.heartbeat > known.heartbeat
                if (info.revision, info.heartbeat) > (known.revision, known.heartbeat):
                    info.heartbeat = max(info.heartbeat, known.heartbeat)
                    self._replace(info, now, alive=fresher)
                    news += 1
                elif fresher:  # older content, but its heartbeat is news
                    news += self.heard(info.peer_id, info.incarnation, info.heartbeat)
        self._forget_old(now)
        return news

    def heard(self, peer_id: str, incarnation: float, heartbeat: int) -> bool:
        """A digest's bare heartbeat for an entry we hold: taken (the peer is alive) when it
        is the same incarnation's and larger. True if it was news."""
        known = self.peers.get(peer_id)
        if (
            peer_id == self.me.peer_id
            or known is None
            or known.incarnation != incarnation
            or heartbeat <= known.heartbeat
        ):
            return False
        known.heartbeat = heartbeat
        self.last_change[peer_id] = self.clock()
        return True

    def digest(self) -> dict[str, list]:
        """{peer id: [incarnation, heartbeat, revision]} of every entry we gossip."""
        return {pid: [p.incarnation, p.heartbeat, p.revision] for pid, p in self.gossiped()}

    def gossiped(self) -> list[tuple[str, PeerInfo]]:
        """(id, entry) of everyone not dead, us included: what we gossip. One clock reading
        for the whole table (this runs for every gossip message)."""
        cutoff = self.clock() - self.dead_after_s
        me, last = self.me.peer_id, self.last_change
        return [(pid, p) for pid, p in self.peers.items() if pid == me or last[pid] > cutoff]

    def status(self, peer_id: str) -> str:
        if peer_id == self.me.peer_id:
            return "alive"
        silent_s = self.quiet_for(peer_id)
        if silent_s >= self.dead_after_s:
            return "dead"
        return "suspect" if silent_s >= self.suspect_after_s else "alive"

    def quiet_for(self, peer_id: str) -> float:
        """Seconds since `peer_id`'s heartbeat last grew here (inf if unknown)."""
        return self.clock() - self.last_change.get(peer_id, -math.inf)

    def declare_dead(self, peer_id: str) -> None:
        """Mark `peer_id` dead now (it failed a direct probe); a newer heartbeat from it
        revives it as usual."""
        if peer_id in self.peers and peer_id != self.me.peer_id:
            self.last_change[peer_id] = min(
                self.last_change[peer_id], self.clock() - self.dead_after_s
            )

    def is_alive(self, peer_id: str) -> bool:
        """Alive or merely suspect: still worth waiting for."""
        return peer_id in self.peers and self.status(peer_id) != "dead"

    def live_others(self) -> list[PeerInfo]:
        return [
            p
            for pid, p in sorted(self.peers.items())
            if pid != self.me.peer_id and self.is_alive(pid)
        ]

    def gossip_targets(self, fanout: int, rng: random.Random) -> list[PeerInfo]:
        others = self.live_others()
        return rng.sample(others, min(fanout, len(others)))

    def probe_target(self, rng: random.Random) -> PeerInfo | None:
        """One random dead, not yet forgotten peer to probe (None if there is none)."""
        dead = [
            p
            for pid, p in sorted(self.peers.items())
            if pid != self.me.peer_id and not self.is_alive(pid)
        ]
        return rng.choice(dead) if dead else None

    def table(self) -> list[dict[str, Any]]:
        """Entries to hand over whole (a join's answer): everyone not yet dead (dead ones are
        judged by each peer)."""
        return [self.wire(p) for _, p in self.gossiped()]

    def wire(self, info: PeerInfo) -> dict[str, Any]:
        """`info` as sent: ours signed over its current content, others' as their owner
        signed them."""
        if info is self.me and self.signer is not None:
            content = entry_bytes(info)
            if content != self._signed:
                info.sig = self.signer.sign(content).hex()
                self._signed = content
        return info.to_wire()

    def _replace(self, info: PeerInfo, now: float, alive: bool) -> None:
        self.peers[info.peer_id] = info
        if alive:
            self.last_change[info.peer_id] = now
        self._record_history(info)

    def _record_history(self, info: PeerInfo) -> None:
        rounds = self.history.setdefault(info.peer_id, {})
        if info.eval_loss is not None or info.train_loss is not None:
            rounds[info.round] = {
                "eval_loss": info.eval_loss,
                "train_loss": info.train_loss,
                "partner_distance": info.partner_distance,
            }
            while len(rounds) > MAX_HISTORY_ROUNDS:
                rounds.pop(min(rounds))

    def _forget_old(self, now: float) -> None:
        for pid in [
            p
            for p, t in self.last_change.items()
            if now - t > self.forget_after_s and p != self.me.peer_id
        ]:
            self.peers.pop(pid, None)
            self.last_change.pop(pid, None)
            self.history.pop(pid, None)
