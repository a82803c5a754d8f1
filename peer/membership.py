"""Membership: the peer table, spread by gossip (`peer.gossip`), and who is alive.

- An entry has two versions. Its heartbeat (incarnation, heartbeat) counts its owner's
  refutations of suspicion (`peer.suspicion`: it no longer beats); its revision
  (incarnation, revision) orders its content: the owner bumps `revision` when anything but
  the heartbeat and the traffic counters changed, and for the counters alone at most every
  `counters_every_s()`. Incarnation is the owner's start time, so a restarted peer with
  the same id supersedes its old self.
- Liveness is SWIM's: a peer is alive until a probe of it fails (`peer.agent`), then
  suspect for `dead_after_s - suspect_after_s`, then dead (left out of rounds and gossip,
  shown dead on the dashboard), dropped `forget_after_s` later. Dead is not final: peers
  probe one dead peer every interval, and an answer revives it (otherwise peers that all
  stalled at once would each mark the others dead and gossip to nobody, forever).
- Entries from the network are validated field by field; a malformed table is rejected
  whole (ProtocolError) and changes nothing. An entry carries its owner's public key and
  signature over `entry_bytes` (all but the heartbeat), so a relayer cannot alter another's
  entry; one that fails `check` (`peer.keybook`) is dropped, not merged.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import time
from collections.abc import Callable
from typing import Any

import msgpack

from shoal.peer.errors import ProtocolError
from shoal.peer.identity import Identity
from shoal.peer.peerinfo import (
    CONTENT_FIELDS,
    COUNTER_FIELDS,
    PROGRESS_FIELDS,
    PeerInfo,
    entry_bytes,
)
from shoal.peer.suspicion import Suspicions

MAX_ENTRIES = 4096
MAX_HISTORY_ROUNDS = 1000
COUNTERS_EVERY_S = 10.0
PROGRESS_EVERY_S = 1.0
BUCKETS = 32  # of ids, for anti-entropy (`Membership.table_sums`)


@functools.lru_cache(maxsize=2 * MAX_ENTRIES)  # asked per entry by every digest and sum
def bucket_of(peer_id: str) -> int:
    return hashlib.sha256(peer_id.encode()).digest()[0] % BUCKETS


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
        self.suspicions = Suspicions(dead_after_s - suspect_after_s, clock)
        self.peers: dict[str, PeerInfo] = {me.peer_id: me}
        self.last_change: dict[str, float] = {me.peer_id: clock()}  # last heard of alive
        self.changed: list[str] = []  # ids whose entry was news here (`peer.gossip` drains it)
        self.history: dict[str, dict[int, dict[str, float | None]]] = {}
        self._content = self._progress = self._counters = None
        self._revised_at = -math.inf
        self._sums: bytes | None = None
        self._ring: list[str] = []
        self.revise()
        self._record_history(me)

    def beat(self) -> None:
        """Once per interval: a new revision if our entry's content changed (the heartbeat
        itself moves only to refute a suspicion, `refute`)."""
        self.revise()
        self.last_change[self.me.peer_id] = self.clock()
        self._record_history(self.me)

    def revise(self, force: bool = False) -> None:
        """Bump our revision if our content changed since the last one (or `force`), or
        only our progress did (`peerinfo.PROGRESS_FIELDS`, a replica's round) and the last
        revision is `progress_every_s()` old, or only the traffic counters did and it is
        `counters_every_s()` old: every revision costs each peer a full entry and a few news
        items, so progress may cost the swarm only so many."""
        soft = ("round",) if self.me.role == "replica" else ()
        me = self.me
        content = tuple(getattr(me, name) for name in CONTENT_FIELDS if name not in soft)
        progress = tuple(getattr(me, name) for name in (*PROGRESS_FIELDS, *soft))
        counters = tuple(getattr(me, name) for name in COUNTER_FIELDS)
        age = self.clock() - self._revised_at
        if (
            force
            or content != self._content
            or (progress != self._progress and age >= self.progress_every_s())
            or (counters != self._counters and age >= self.counters_every_s())
        ):
            if self._content is not None:
                me.revision += 1
                self._note(me.peer_id)
            self._content, self._progress, self._counters = content, progress, counters
            self._revised_at = self.clock()

    def refute(self, heartbeat: int) -> None:
        """Someone suspects us at `heartbeat`: move ours past it."""
        self.me.heartbeat = max(self.me.heartbeat, heartbeat) + 1

    def progress_every_s(self) -> float:
        """Least seconds between revisions for progress alone: a second, or half a second
        per peer known, so that progress costs the swarm at most ~2 revisions a second
        whatever its size (the dashboard's figures lag more in big swarms)."""
        return max(PROGRESS_EVERY_S, 0.5 * len(self.peers))

    def counters_every_s(self) -> float:
        """Least seconds between revisions for the traffic counters alone: 10 s, or half a
        second per peer known, so that the revisions they cause stay under 2 per second
        swarm-wide whatever its size (each costs every peer a full entry and a few news
        items; the dashboard's counters lag more in big swarms)."""
        return max(COUNTERS_EVERY_S, 0.5 * len(self.peers))

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
        the two: heartbeats also travel alone (suspicion news), so a copy may bring a newer
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
                self.suspicions.clear(info.peer_id)
                self._replace(info, now, alive=True)
                news += 1
            elif info.incarnation == known.incarnation:
                fresher = info.heartbeat > known.heartbeat
                if (info.revision, info.heartbeat) > (known.revision, known.heartbeat):
                    info.heartbeat = max(info.heartbeat, known.heartbeat)
                    self._replace(info, now, alive=fresher)
                    if fresher:
                        self.suspicions.clear(info.peer_id, info.heartbeat)
                    news += 1
                elif fresher:  # older content, but its heartbeat is news
                    news += self.heard(info.peer_id, info.incarnation, info.heartbeat)
        self._forget_old(now)
        return news

    def heard(self, peer_id: str, incarnation: float, heartbeat: int) -> bool:
        """A heartbeat (a refutation) for an entry we hold: taken when it is the same
        incarnation's and larger; it clears a suspicion of a lower heartbeat. True if news."""
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
        self.suspicions.clear(peer_id, heartbeat)
        return True

    def touch(self, peer_id: str) -> None:
        """`peer_id` just answered us or wrote to us: it is alive, whatever we suspected."""
        if peer_id in self.peers and peer_id != self.me.peer_id:
            self.last_change[peer_id] = self.clock()
            self.suspicions.clear(peer_id)

    def suspect(self, peer_id: str, heartbeat: int | None = None, dead: bool = False) -> bool:
        """Suspect `peer_id` (or hold it dead) at `heartbeat` (default: the one we know);
        ignored when stale (a refutation already passed it). True if news here."""
        known = self.peers.get(peer_id)
        if known is None or peer_id == self.me.peer_id:
            return False
        heartbeat = known.heartbeat if heartbeat is None else heartbeat
        if heartbeat < known.heartbeat:
            return False
        known.heartbeat = heartbeat
        if dead:
            return self.suspicions.dead(peer_id, heartbeat)
        return self.status(peer_id) != "dead" and self.suspicions.suspect(peer_id, heartbeat)

    def digest(self, buckets: set[int] | None = None) -> dict[str, list]:
        """{peer id: [incarnation, heartbeat, revision]} of every entry we gossip (of the
        `buckets` only, when given)."""
        return {
            pid: [p.incarnation, p.heartbeat, p.revision]
            for pid, p in self.gossiped()
            if buckets is None or bucket_of(pid) in buckets
        }

    def table_sums(self) -> bytes:
        """4 bytes per bucket of ids (`bucket_of`) that two tables holding the same entries
        (id, incarnation, revision) share: anti-entropy compares them and sends digests
        of the buckets that differ only."""
        if self._sums is None:
            items: list[list] = [[] for _ in range(BUCKETS)]
            for pid, p in sorted(self.peers.items()):
                items[bucket_of(pid)].append((pid, p.incarnation, p.revision))
            self._sums = b"".join(hashlib.sha256(msgpack.packb(i)).digest()[:4] for i in items)
        return self._sums

    def table_sum(self) -> bytes:
        """8 bytes of `table_sums`: every probe carries it."""
        return hashlib.sha256(self.table_sums()).digest()[:8]

    def gossiped(self) -> list[tuple[str, PeerInfo]]:
        """(id, entry) of everyone not dead, us included: what we gossip."""
        return [(pid, p) for pid, p in self.peers.items() if self.status(pid) != "dead"]

    def status(self, peer_id: str) -> str:
        if peer_id == self.me.peer_id:
            return "alive"
        if peer_id not in self.peers:
            return "dead"
        return self.suspicions.status(peer_id)

    def quiet_for(self, peer_id: str) -> float:
        """Seconds since we last heard that `peer_id` is alive (inf if unknown)."""
        return self.clock() - self.last_change.get(peer_id, -math.inf)

    def declare_dead(self, peer_id: str) -> None:
        """Mark `peer_id` dead now (it failed a direct probe); a refutation (a larger
        heartbeat) or its answer to a probe revives it."""
        self.suspect(peer_id, dead=True)

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

    def next_probe(self, rng: random.Random) -> PeerInfo | None:
        """SWIM's probe order: every live peer once, in a random order, then a new order;
        so each is probed within two rounds of N - 1 intervals even at worst."""
        while self._ring:
            pid = self._ring.pop()
            if pid in self.peers and self.is_alive(pid):
                return self.peers[pid]
        self._ring = [p.peer_id for p in self.live_others()]
        rng.shuffle(self._ring)
        return self.peers[self._ring.pop()] if self._ring else None

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
        self._note(info.peer_id)
        self._record_history(info)

    def _note(self, peer_id: str) -> None:
        self.changed.append(peer_id)
        self._sums = None

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
        """Drop peers dead for `forget_after_s` (since their last sign of life)."""
        for pid in [
            p
            for p, t in self.last_change.items()
            if now - max(t, self.suspicions.began(p) or t) > self.forget_after_s
            and p != self.me.peer_id
            and self.status(p) == "dead"
        ]:
            self.peers.pop(pid, None)
            self.last_change.pop(pid, None)
            self.history.pop(pid, None)
            self.suspicions.clear(pid)
            self._sums = None
