"""Gossip messages: SWIM-style probes that carry news, so a live swarm costs each peer a
small, fixed amount of traffic whatever its size. No I/O here: `peer.agent` sends these
messages, and `scripts/sim_membership.py` runs the same code over a simulated network.

One exchange, A (the initiator) with B, is a probe of B:
1. A → B `POST /gossip {news, events, sum}`:
   - `news`: {peer id: [incarnation, heartbeat, revision]} of the entries that recently
     changed at A (each is repeated on A's next `sends()` messages, then dropped);
   - `events`: [[peer id, incarnation, heartbeat, "alive" | "suspect" | "dead"]], the
     suspicion news of `peer.suspicion` (repeated the same way);
   - `sum`: 8 bytes of a hash of A's table (ids, incarnations, revisions).
   Optionally `digest` (A's whole digest: anti-entropy, below) or `probe: id` (an indirect
   probe: B probes that peer for A and answers `acked`).
2. B takes the news and answers `{news, events, sum, want}`: its own recent news, and
   `want`, the ids whose entry A's news shows newer than B's.
3. Only if either side wants entries: A → B `{peers, want}` (the entries B wanted, and the
   ids A wants from B's news) → B answers `{peers}`.
An answer in time is the probe's success (`peer.agent` then probes indirectly and, on
failure, starts a suspicion). An event that changed what a peer believes, and a peer
never seen before, make it `fresh`: the agent then exchanges with `gossip_fanout` peers at
once rather than at its next probe, so deaths and joins spread in a few hops.

**Anti-entropy.** News is repeated a bounded number of times, so a peer can miss some.
When an answer's `sum` differs from ours, at most every `ANTI_ENTROPY_BEATS` heartbeats
the agent compares with that peer: A sends `{sums}` (4 bytes per bucket of ids, 32
buckets), B answers `{buckets}` that differ, and A runs the digest exchange for those:
A sends its digest of them (`digest`, `buckets`), B answers every entry of them that A
lacks or holds older (at most `MAX_DELTAS`), bare heartbeats where only B's is newer, and
`want`; A pushes what B wanted. So a table that differs in a few entries costs a few
buckets' digests, not the whole table's. A join (`/join`) hands over the whole table once.

Every part of a message is validated before anything is taken (ProtocolError: nothing
changes): at most `MAX_ENTRIES` digest items, news, events, beats and wants, at most
`MAX_DELTAS` full entries, each parsed strictly (`PeerInfo.from_wire`). Full entries are
signed by their owner (`Membership.wire`) and relayed as they came: one that fails its
check is dropped (`Membership.take`). Events and heartbeats are not signed: a key holder
could raise a false suspicion, which its target refutes, or keep a dead peer looking alive
until a probe of it fails.
"""

from __future__ import annotations

import math
import random
from typing import Any

from shoal.peer.errors import ProtocolError
from shoal.peer.membership import BUCKETS, MAX_ENTRIES, Membership, PeerInfo, bucket_of

MAX_DELTAS = 256  # full entries in one gossip message (~90 KB)
MAX_PIGGYBACK = 64  # news items, and events, carried by one message
MAX_HEARTBEAT_STEP = 1 << 20  # an event further ahead of the heartbeat we know is ignored
_MAX_ID = 128
_MAX_INT = 2**63
STANDBY_ROUND = 2**62  # a standby's first_round (`holders.NEVER`; that module needs torch)
STATES = ("alive", "suspect", "dead")


class Gossip:
    """Builds and answers gossip messages over one `Membership`."""

    def __init__(self, membership: Membership, rng: random.Random) -> None:
        self.membership = membership
        self.rng = rng
        self.hot_news: dict[str, int] = {}  # id -> sends left
        self.hot_events: dict[str, list] = {}  # id -> [[id, inc, hb, state], sends left]
        self.fresh = False  # something worth spreading at once arrived (`peer.agent` floods)
        self.sum_differs = False  # the last answer's table sum was not ours

    def sends(self) -> int:
        """How many messages repeat one piece of news: enough, with every peer's probes,
        to reach all N with high probability (SWIM's λ·log N); anti-entropy catches the
        rest."""
        return math.ceil(math.log2(len(self.membership.peers) + 1)) + 2

    # ---- the three messages --------------------------------------------------------------

    def request(
        self,
        full: bool = False,
        probe: str | None = None,
        events: list | None = None,
        buckets: list[int] | None = None,
    ) -> dict[str, Any]:
        """Step 1: what an initiator sends; `full` adds our digest (of `buckets` only, when
        given), `probe` asks the target to probe that peer for us, `events` are sent
        besides our recent ones."""
        message = self._piggyback()
        if events:
            message["events"] = [*events, *message["events"]][:MAX_PIGGYBACK]
        if full:
            chosen = None if buckets is None else set(buckets)
            message["digest"] = self.membership.digest(chosen)
            if buckets is not None:
                message["buckets"] = buckets
        if probe is not None:
            message["probe"] = probe
        return message

    def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Step 2 (server side), or step 3's answer for a message without `sum`."""
        _check_map(payload)
        news = parse_digest(payload.get("news", {}), "news")
        digest = parse_digest(payload.get("digest", {}), "digest")
        events = parse_events(payload.get("events", []))
        entries = parse_entries(payload.get("peers", []))
        asked = parse_ids(payload.get("want", []), "want")
        parse_sum(payload.get("sum", b""))
        buckets = parse_buckets(payload.get("buckets", list(range(BUCKETS))))
        if "probe" in payload:
            _check_id(payload["probe"], "probe")
        m = self.membership
        if "sums" in payload:  # anti-entropy's first step: which buckets differ
            return {"buckets": self.differing(parse_sums(payload["sums"]))}
        m.take(entries)
        self._take_events(events)
        if "sum" not in payload:  # step 3: entries for us, and what it wants of our news
            return {"peers": self._entries(asked)}
        want = self._wants(news) + self._wants(digest)
        answer = {**self._piggyback(), "want": want[:MAX_ENTRIES]}
        if "digest" in payload:
            answer["peers"], answer["beats"] = self._news_for(digest, set(buckets))
        m.take([])  # forgets the long dead
        return answer

    def take_answer(self, answer: dict[str, Any], request: dict[str, Any]) -> dict[str, Any] | None:
        """Step 2's answer, at the initiator that sent `request`: take its news; returns
        step 3's message (the entries it wants, and what we want) or None."""
        _check_map(answer)
        news = parse_digest(answer.get("news", {}), "news")
        events = parse_events(answer.get("events", []))
        entries = parse_entries(answer.get("peers", []))
        beats = parse_beats(answer.get("beats", {}))
        asked = parse_ids(answer.get("want", []), "want")
        their_sum = parse_sum(answer.get("sum", b""))
        m = self.membership
        m.take(entries)
        self._take_events(events)
        sent = request.get("digest", {})
        for pid, heartbeat in beats.items():
            if pid in sent:  # a bare heartbeat is for the incarnation our digest named
                m.heard(pid, sent[pid][0], heartbeat)
        want = self._wants(news)
        self.sum_differs = bool(their_sum) and their_sum != m.table_sum()
        if not asked and not want:
            return None
        return {"peers": self._entries(asked), "want": want}

    def take_entries(self, answer: dict[str, Any]) -> None:
        """Step 3's answer: the entries we wanted."""
        _check_map(answer)
        self.membership.take(parse_entries(answer.get("peers", [])))

    # ---- news and events ---------------------------------------------------------------

    def spread(self, peer_id: str, state: str) -> list:
        """Start news that `peer_id` (at the heartbeat we know) is `state`; returns the
        event."""
        info = self.membership.peers[peer_id]
        event = [peer_id, info.incarnation, info.heartbeat, state]
        self.hot_events.pop(peer_id, None)  # newest last
        self.hot_events[peer_id] = [event, self.sends()]
        self.fresh = True
        return event

    def _piggyback(self) -> dict[str, Any]:
        m = self.membership
        for pid in m.changed:  # newest last
            self.hot_news.pop(pid, None)
            self.hot_news[pid] = self.sends()
        m.changed.clear()
        news = {}
        for pid in list(self.hot_news)[-MAX_PIGGYBACK:]:
            info = m.peers.get(pid)
            self.hot_news[pid] -= 1
            if self.hot_news[pid] <= 0:
                del self.hot_news[pid]
            if info is not None and m.is_alive(pid):
                news[pid] = [info.incarnation, info.heartbeat, info.revision]
        events = []
        for pid in list(self.hot_events)[-MAX_PIGGYBACK:]:
            item = self.hot_events[pid]
            events.append(item[0])
            item[1] -= 1
            if item[1] <= 0:
                del self.hot_events[pid]
        return {"news": news, "events": events, "sum": m.table_sum()}

    def _wants(self, news: dict[str, tuple]) -> list[str]:
        """Ids whose entry `news` shows newer than ours (their heartbeats taken on the way);
        a peer we never saw makes us `fresh`."""
        m = self.membership
        want = []
        for pid, (incarnation, heartbeat, revision) in news.items():
            known = m.peers.get(pid)
            if pid == m.me.peer_id:
                continue
            if known is None or incarnation > known.incarnation:
                want.append(pid)
                self.fresh = True
            elif incarnation == known.incarnation:
                m.heard(pid, incarnation, heartbeat)
                if revision > known.revision:
                    want.append(pid)
        return want

    def _take_events(self, events: list[tuple[str, float, int, str]]) -> None:
        """Suspicion news (`peer.suspicion`): a suspicion of us is refuted at once."""
        m = self.membership
        me = m.me
        for pid, incarnation, heartbeat, state in events:
            known = me if pid == me.peer_id else m.peers.get(pid)
            if known is not None and heartbeat > known.heartbeat + MAX_HEARTBEAT_STEP:
                continue  # no peer refutes that often: a forger pushing it towards 2**63
            if pid == me.peer_id:
                if state != "alive" and incarnation == me.incarnation and heartbeat >= me.heartbeat:
                    m.refute(heartbeat)
                    self.spread(pid, "alive")
                continue
            if known is None or known.incarnation != incarnation:
                continue
            if state == "alive":
                changed = m.heard(pid, incarnation, heartbeat)
            else:
                changed = m.suspect(pid, heartbeat, dead=state == "dead")
            if changed:
                self.spread(pid, state)

    def _entries(self, ids: list[str]) -> list[dict[str, Any]]:
        m = self.membership
        wanted = [m.wire(m.peers[pid]) for pid in ids if pid in m.peers]
        if len(wanted) > MAX_DELTAS:
            wanted = self.rng.sample(wanted, MAX_DELTAS)
        return wanted

    def differing(self, sums: bytes) -> list[int]:
        """The buckets whose sums (`Membership.table_sums`) differ from ours."""
        ours = self.membership.table_sums()
        return [b for b in range(BUCKETS) if sums[4 * b : 4 * b + 4] != ours[4 * b : 4 * b + 4]]

    def _news_for(
        self, digest: dict[str, tuple], buckets: set[int]
    ) -> tuple[list[dict[str, Any]], dict]:
        """(full entries, bare heartbeats) that the owner of `digest` (of `buckets`) lacks:
        of the entries we gossip, those it does not hold or holds an older revision of,
        and those where only our heartbeat is newer."""
        m = self.membership
        deltas, beats = [], {}
        for pid, info in m.gossiped():
            if bucket_of(pid) not in buckets:
                continue
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


def parse_digest(obj: Any, what: str = "digest") -> dict[str, tuple[float, int, int]]:
    """A digest (or news), strictly: {id: [incarnation, heartbeat, revision]}, at most
    MAX_ENTRIES."""
    if not isinstance(obj, dict) or len(obj) > MAX_ENTRIES:
        raise ProtocolError(f"gossip {what} must be a map of at most {MAX_ENTRIES} peers")
    digest = {}
    for pid, item in obj.items():
        _check_id(pid, what)
        if not isinstance(item, list) or len(item) != 3:
            raise ProtocolError(f"gossip {what} items must be [incarnation, heartbeat, revision]")
        incarnation, heartbeat, revision = item
        digest[pid] = (_incarnation(incarnation), _count(heartbeat), _count(revision))
    return digest


def parse_events(obj: Any) -> list[tuple[str, float, int, str]]:
    """Suspicion events, strictly: [[id, incarnation, heartbeat, state]], at most
    MAX_ENTRIES."""
    if not isinstance(obj, list) or len(obj) > MAX_ENTRIES:
        raise ProtocolError(f"gossip events must be a list of at most {MAX_ENTRIES}")
    events = []
    for item in obj:
        if not isinstance(item, list) or len(item) != 4 or item[3] not in STATES:
            raise ProtocolError(f"gossip events must be [id, incarnation, heartbeat, {STATES}]")
        _check_id(item[0], "events")
        events.append((item[0], _incarnation(item[1]), _count(item[2]), item[3]))
    return events


def parse_sum(obj: Any) -> bytes:
    if not isinstance(obj, bytes) or len(obj) > 32:
        raise ProtocolError("gossip sum must be at most 32 bytes")
    return obj


def parse_sums(obj: Any) -> bytes:
    if not isinstance(obj, bytes) or len(obj) != 4 * BUCKETS:
        raise ProtocolError(f"gossip sums must be {4 * BUCKETS} bytes")
    return obj


def parse_buckets(obj: Any) -> list[int]:
    if (
        not isinstance(obj, list)
        or len(obj) > BUCKETS
        or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < BUCKETS for b in obj)
    ):
        raise ProtocolError(f"gossip buckets must be a list of ids in 0..{BUCKETS - 1}")
    return obj


def parse_acked(obj: Any) -> bool:
    if not isinstance(obj, bool):
        raise ProtocolError("gossip acked must be a boolean")
    return obj


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


def _incarnation(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError("gossip incarnations must be finite numbers")
    return float(value)


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
