"""Gossip messages: push-pull anti-entropy with digests, so a heartbeat costs a counter and
only changed entries travel whole. No I/O here: `peer.agent` sends these messages, and
`scripts/sim_membership.py` runs the same code over a simulated network.

One exchange, A (the initiator) with B:
1. A → B `POST /gossip {digest}`: A's digest, {peer id: [incarnation, heartbeat,
   revision]} of every entry A gossips (itself included).
2. B takes from the digest every heartbeat newer than its own (same incarnation), and
   answers `{peers, beats, want}`: the full entries A lacks or holds an older revision of
   (at most `MAX_DELTAS`), `beats` {peer id: heartbeat} where only B's heartbeat is newer
   (for the incarnation A's digest named), and `want`: the ids whose entry A holds newer.
3. Only if B wants something: A → B `POST /gossip {peers}` with those entries.
So news crosses in both directions in one exchange, as with whole tables, and a join
(`/join` still hands over the whole table, once) spreads push and pull.

Why digests and not tables: every heartbeat changes every entry, so a whole table is news
on every exchange, and each peer sent about 2 × fanout × N full entries (~350 bytes each) a
second. A digest item is ~30 bytes, and an entry travels whole only when its revision
moved. The digest is still one item per live peer: failure detection by heartbeat
counters needs every peer to see every other's counter move within `suspect_after_s`, so
each peer must hear of all N counters every few seconds whatever the encoding: bytes per
peer still grow with N, 16-23x less than with tables at N = 10-1000 (~100 bytes per peer in
the table per second at fanout 3). A digest of a sample would leave counters unrefreshed for
seconds (false suspicion); a hash of the table never matches while counters move.
`scripts/sim_membership.py` measures both (README: "Gossip at scale").

Every part of a message is validated before anything is taken (ProtocolError: nothing
changes): at most `MAX_ENTRIES` digest items, beats and wants, at most `MAX_DELTAS` full
entries, each parsed strictly (`PeerInfo.from_wire`). Full entries are signed by their
owner (`Membership.wire`) and relayed as they came: one that fails its check is dropped
(`Membership.take`). Bare heartbeats are not signed (a key holder could keep a dead peer's
counter moving; the probe of `peer.agent` and the rounds' deadlines still bound what that
costs).
"""

from __future__ import annotations

import math
import random
from typing import Any

from shoal.peer.errors import ProtocolError
from shoal.peer.membership import MAX_ENTRIES, Membership, PeerInfo

MAX_DELTAS = 256  # full entries in one gossip message (~90 KB)
_MAX_ID = 128
_MAX_INT = 2**63
STANDBY_ROUND = 2**62  # a standby's first_round (`holders.NEVER`; that module needs torch)


class Gossip:
    """Builds and answers gossip messages over one `Membership`."""

    def __init__(self, membership: Membership, rng: random.Random) -> None:
        self.membership = membership
        self.rng = rng

    def request(self) -> dict[str, Any]:
        """Step 1: what an initiator sends (one per heartbeat serves every target)."""
        return {"digest": self.membership.digest()}

    def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Step 2 (server side): take the sender's news, answer with what it lacks. A
        message without a digest (step 3, or a bare push) only has its entries taken."""
        _check_map(payload)
        digest = parse_digest(payload.get("digest", {}))
        entries = parse_entries(payload.get("peers", []))
        m = self.membership
        m.take(entries)
        want = []
        for pid, (incarnation, heartbeat, revision) in digest.items():
            known = m.peers.get(pid)
            if pid == m.me.peer_id:
                continue
            if known is None or incarnation > known.incarnation:
                want.append(pid)
            elif incarnation == known.incarnation:
                m.heard(pid, incarnation, heartbeat)
                if revision > known.revision:
                    want.append(pid)
        answer: dict[str, Any] = {}
        if "digest" in payload:
            deltas, beats = self._news_for(digest)
            answer = {"peers": deltas, "beats": beats, "want": want[:MAX_ENTRIES]}
        m.take([])  # forgets the long dead
        return answer

    def take_answer(self, answer: dict[str, Any], request: dict[str, Any]) -> dict[str, Any] | None:
        """Step 2's answer, at the initiator that sent `request`: take its news; returns
        step 3's message (the entries the other side wants) or None."""
        _check_map(answer)
        entries = parse_entries(answer.get("peers", []))
        beats = parse_beats(answer.get("beats", {}))
        want = parse_ids(answer.get("want", []), "want")
        m = self.membership
        m.take(entries)
        sent = request["digest"]
        for pid, heartbeat in beats.items():
            if pid in sent:  # a bare heartbeat is for the incarnation our digest named
                m.heard(pid, sent[pid][0], heartbeat)
        wanted = [m.wire(m.peers[pid]) for pid in want if pid in m.peers]
        if len(wanted) > MAX_DELTAS:
            wanted = self.rng.sample(wanted, MAX_DELTAS)
        return {"peers": wanted} if wanted else None

    def _news_for(self, digest: dict[str, tuple]) -> tuple[list[dict[str, Any]], dict]:
        """(full entries, bare heartbeats) that the owner of `digest` lacks: of the entries
        we gossip, those it does not hold or holds an older revision of, and those where
        only our heartbeat is newer."""
        m = self.membership
        deltas, beats = [], {}
        for pid, info in m.gossiped():
            theirs = digest.get(pid)
            if theirs is None or info.incarnation > theirs[0]:
                deltas.append(info)
            elif info.incarnation == theirs[0]:
                if info.revision > theirs[2]:
                    deltas.append(info)
                elif info.heartbeat > theirs[1]:
                    beats[pid] = info.heartbeat
        if len(deltas) > MAX_DELTAS:  # the rest at later exchanges
            deltas = self.rng.sample(deltas, MAX_DELTAS)
        return [m.wire(p) for p in deltas], beats


def parse_digest(obj: Any) -> dict[str, tuple[float, int, int]]:
    """A digest, strictly: {id: [incarnation, heartbeat, revision]}, at most MAX_ENTRIES."""
    if not isinstance(obj, dict) or len(obj) > MAX_ENTRIES:
        raise ProtocolError(f"gossip digest must be a map of at most {MAX_ENTRIES} peers")
    digest = {}
    for pid, item in obj.items():
        _check_id(pid, "digest")
        if not isinstance(item, list) or len(item) != 3:
            raise ProtocolError("gossip digest items must be [incarnation, heartbeat, revision]")
        incarnation, heartbeat, revision = item
        if (
            not isinstance(incarnation, (int, float))
            or isinstance(incarnation, bool)
            or not math.isfinite(incarnation)
        ):
            raise ProtocolError("gossip digest incarnation must be a finite number")
        digest[pid] = (float(incarnation), _count(heartbeat), _count(revision))
    return digest


def parse_entries(obj: Any) -> list[PeerInfo]:
    if not isinstance(obj, list) or len(obj) > MAX_DELTAS:
        raise ProtocolError(f"gossip entries must be a list of at most {MAX_DELTAS}")
    return [PeerInfo.from_wire(e) for e in obj]


def parse_beats(obj: Any) -> dict[str, int]:
    if not isinstance(obj, dict) or len(obj) > MAX_ENTRIES:
        raise ProtocolError(f"gossip beats must be a map of at most {MAX_ENTRIES} peers")
    for pid in obj:
        _check_id(pid, "beats")
    return {pid: _count(hb) for pid, hb in obj.items()}


def parse_ids(obj: Any, what: str) -> list[str]:
    if not isinstance(obj, list) or len(obj) > MAX_ENTRIES:
        raise ProtocolError(f"gossip {what} must be a list of at most {MAX_ENTRIES} peer ids")
    for pid in obj:
        _check_id(pid, what)
    return obj


def _check_map(payload: Any) -> None:
    if not isinstance(payload, dict):
        raise ProtocolError("a gossip message must be a map")


def _check_id(pid: Any, what: str) -> None:
    if not isinstance(pid, str) or not 0 < len(pid) <= _MAX_ID:
        raise ProtocolError(f"gossip {what} peer ids must be strings of 1..{_MAX_ID} chars")


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < _MAX_INT:
        raise ProtocolError("gossip counters must be non-negative integers")
    return value


def barrier_open(membership: Membership, min_peers: int) -> bool:
    """The --min-peers start barrier, swarm-wide: open once `min_peers` live peers (us
    included) are at the barrier or past it, or as soon as any live peer is training or
    past round 0 (the run has started: a late joiner joins it rather than waiting).

    Counting entries is not enough: a peer is in the table from its join on, long before
    it can train, so the first peer would start alone while the others still build. A
    standby (first round NEVER) counts as ready from its join on: it trains no round 0."""
    others = membership.live_others()
    if any(p.phase == "training" or p.round > 0 for p in others):
        return True
    ready = sum(
        p.phase is not None or p.first_round >= STANDBY_ROUND for p in [membership.me, *others]
    )
    return ready >= min_peers
