"""The membership agent: joining a run, gossiping the peer table, knowing who is alive.

Messages (see `peer.membership` for the table and its liveness rules):
- `POST /join {peer, run}` → `{swarm_id, run, peers, round}`: a joiner introduces itself
  to any peer of the run; the answer refuses (409) a run config that differs and otherwise
  hands over the swarm id, the peer table and the run's round. The joiner's entry must be
  signed by the key that signed the request (`peer.keybook`: the key then owns the id).
  The joiner retries an unreachable bootstrap for `join_timeout_s`. With `dial_back` in
  the request, the answer also says whether the joiner could be called back at its
  advertised address (`reachable`; else it goes into client mode: `peer.tunnel`).
- `POST /gossip` (`peer.gossip`), SWIM's failure detector: every `heartbeat_interval_s` the
  agent probes the next live peer of a shuffled ring (an exchange that carries news). If
  no answer comes within `ping_timeout_s()`, it asks `INDIRECT` other peers to probe it;
  if none of them reaches it either, it suspects it (`peer.suspicion`) and spreads that
  at once to `gossip_fanout` peers and the suspect itself, which refutes it if alive.
  It also probes one dead, not yet forgotten peer per interval, telling it that it is
  held dead (an answer revives it), and runs anti-entropy (`ANTI_ENTROPY_BEATS`).
  Probes run off the heartbeat path: a dead host may hang one for its timeout.
- The --min-peers start barrier is swarm-wide (`gossip.barrier_open`): a peer gossips that
  it is ready, and starts once `min_peers` are, or once any live peer already trains.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

from shoal.peer.client import PeerClient
from shoal.peer.config import ProtocolConfig, RunConfig
from shoal.peer.errors import AuthError, ProtocolError, ShoalError
from shoal.peer.gossip import Gossip, barrier_open, parse_acked, parse_buckets
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.runfiles import call_bootstrap
from shoal.peer.tasks import TaskOwner
from shoal.peer.tunnel import dial_back
from shoal.peer.wire import Envelope, WireCodec

log = logging.getLogger(__name__)


INDIRECT = 2  # peers asked to probe a peer that did not answer us
ANTI_ENTROPY_BEATS = 3  # at most one anti-entropy comparison per this many heartbeats


class MembershipAgent:
    def __init__(
        self,
        me: PeerInfo,
        run: RunConfig,
        protocol: ProtocolConfig,
        client: PeerClient,
        wire: WireCodec,
        tasks: TaskOwner,
        current_round: Callable[[], int],
        before_beat: Callable[[PeerInfo], None] = lambda me: None,
    ) -> None:
        self.membership = Membership(
            me,
            suspect_after_s=protocol.suspect_after_s,
            dead_after_s=protocol.dead_after_s,
            forget_after_s=protocol.forget_after_s,
            signer=wire.identity,
            check=wire.keybook.check_entry,
        )
        self.run, self.protocol, self.client, self.wire, self.tasks = (
            run,
            protocol,
            client,
            wire,
            tasks,
        )
        self.current_round = current_round
        self.before_beat = before_beat  # refreshes our entry's counters before each heartbeat
        self._rng = random.Random(secrets.randbits(64))
        self.gossip = Gossip(self.membership, self._rng)
        self.reachable: bool | None = None  # the dial-back's verdict at join (peer.tunnel)
        self._revive: asyncio.Task | None = None
        self._flood: asyncio.Task | None = None
        self._full_at = -float("inf")

    @property
    def me(self) -> PeerInfo:
        return self.membership.me

    @property
    def peer_id(self) -> str:
        return self.membership.me.peer_id

    # ---- joining ---------------------------------------------------------------------

    async def join(self, bootstrap: str, dial_back: bool = False) -> int:
        """Introduce ourselves to the run through `bootstrap`; returns the run's round.
        `dial_back`: ask it to call us back; its verdict lands in `reachable`."""
        request = {"peer": self.membership.wire(self.me), "run": self.run.to_dict()}
        if dial_back:
            request["dial_back"] = True
        answer = await call_bootstrap(
            self.client, bootstrap, "/join", request, self.protocol.join_timeout_s
        )
        RunConfig.from_dict(answer.get("run", {})).check_same(self.run)
        self.wire.swarm_id = str(answer["swarm_id"])
        self.membership.merge(answer.get("peers"))
        self.membership.changed.clear()  # the swarm's table is no news to the swarm
        reachable = answer.get("reachable")
        self.reachable = reachable if isinstance(reachable, bool) else None
        return int(answer.get("round", 0))

    async def welcome(self, envelope: Envelope) -> dict[str, Any]:
        """Answer a `/join` (server side): check the joiner's run config and entry, add it;
        dial it back if it asks (`peer.tunnel`: is it behind NAT?)."""
        run = envelope.payload.get("run")
        if not isinstance(run, dict):
            raise ProtocolError("join needs the joiner's run config")
        RunConfig.from_dict(run).check_same(self.run)
        entry = PeerInfo.from_wire(envelope.payload.get("peer"))
        if entry.peer_id != envelope.sender:
            raise ProtocolError("join entry's peer_id differs from the sender")
        if entry.pubkey != envelope.key or not self.wire.keybook.check_entry(entry):
            raise AuthError("join entry is not signed by the key that signed the request")
        self.membership.merge([entry.to_wire()])
        self.gossip.fresh = True  # a join spreads at once
        self.spread_fresh()
        log.info("[%s] %s joined from %s", self.peer_id, entry.peer_id, entry.address)
        answer = {
            "swarm_id": self.wire.swarm_id,
            "run": self.run.to_dict(),
            "peers": self.membership.table(),
            "round": self.current_round(),
        }
        if envelope.payload.get("dial_back") is True:
            timeout_s = self.protocol.dial_back_timeout_s
            answer["reachable"] = await dial_back(self.client, entry, timeout_s)
        return answer

    async def wait_for_peers(self, count: int, timeout_s: float) -> None:
        """The start barrier: say we are ready, and wait until `count` live peers (us
        included) are, or any live peer already trains (`gossip.barrier_open`); ShoalError
        after `timeout_s`. Past it we say we train, which opens it for everyone still
        waiting, so round 0 starts swarm-wide within a few heartbeats."""
        deadline = time.monotonic() + timeout_s
        log.info("[%s] waiting for %d peers before training", self.peer_id, count)
        self.me.phase = "ready"
        self.membership.revise()
        while not barrier_open(self.membership, count):
            if time.monotonic() > deadline:
                ready = sum(p.phase is not None for p in self.membership.live_others()) + 1
                raise ShoalError(
                    f"only {ready} of the {count} peers of --min-peers joined and were ready "
                    f"within {timeout_s:.0f} s (--min-peers-timeout)"
                )
            await asyncio.sleep(0.2)
        self.me.phase = "training"
        self.membership.revise()

    # ---- gossip ----------------------------------------------------------------------

    async def gossip_answer(self, envelope: Envelope) -> dict[str, Any]:
        """Answer a `/gossip` (server side), see `peer.gossip`; an indirect probe waits for
        ours of the peer named."""
        payload = envelope.payload
        self.membership.touch(envelope.sender)
        answer = self.gossip.answer(payload)
        if "probe" in payload:
            target = self.membership.peers.get(payload["probe"])
            timeout_s = self.protocol.ping_timeout_s()
            if target is self.me:  # asked about ourselves: we answer, so we are alive
                answer["acked"] = True
            else:
                answer["acked"] = target is not None and await self.gossip_with(target, timeout_s)
        self.spread_fresh()
        return answer

    def beat(self) -> None:
        self.before_beat(self.me)
        self.membership.beat()

    async def gossip_forever(self) -> None:
        interval = self.protocol.heartbeat_interval_s
        while True:
            self.beat()
            target = self.membership.next_probe(self._rng)
            if target is not None:  # one a heartbeat, whether or not the last has ended
                self.tasks.spawn(self.probe(target), name="probe")
            dead = self.membership.probe_target(self._rng)
            if dead is not None and (self._revive is None or self._revive.done()):
                held = [dead.peer_id, dead.incarnation, dead.heartbeat, "dead"]
                revive = self.gossip_with(dead, events=[held])
                self._revive = self.tasks.spawn(revive, name="revive")
            self.spread_fresh()
            await asyncio.sleep(interval)

    async def probe(self, peer: PeerInfo) -> bool:
        """SWIM's probe of `peer`: directly, then through `INDIRECT` others; a peer that
        none reaches is suspected, and the suspicion spread at once (to it too). True if
        it answered someone."""
        timeout_s = self.protocol.ping_timeout_s()
        if await self.gossip_with(peer, timeout_s):
            return True
        m = self.membership
        helpers = [p for p in m.live_others() if p.peer_id != peer.peer_id]
        helpers = self._rng.sample(helpers, min(INDIRECT, len(helpers)))
        asked = await asyncio.gather(*(self._ask_probe(h, peer, timeout_s) for h in helpers))
        if any(asked) or not m.suspect(peer.peer_id):
            return any(asked)
        log.info("[%s] %s did not answer a probe: suspect", self.peer_id, peer.peer_id)
        self.gossip.spread(peer.peer_id, "suspect")
        self.spread_fresh(also=peer)
        return False

    async def _ask_probe(self, helper: PeerInfo, peer: PeerInfo, timeout_s: float) -> bool:
        request = self.gossip.request(probe=peer.peer_id)
        try:
            answer = await self.client.call(
                helper.address, "POST", "/gossip", request, timeout_s=2 * timeout_s + 1
            )
            self.gossip.take_answer(answer.payload, request)
            return parse_acked(answer.payload.get("acked"))
        except ShoalError as exc:
            log.debug("[%s] indirect probe via %s failed: %s", self.peer_id, helper.peer_id, exc)
            return False

    def spread_fresh(self, also: PeerInfo | None = None) -> None:
        """Something worth spreading at once arrived (`Gossip.fresh`): exchange with
        `gossip_fanout` random live peers (and `also`) now, one such flood at a time."""
        if not self.gossip.fresh or (self._flood is not None and not self._flood.done()):
            return
        self.gossip.fresh = False
        targets = self.membership.gossip_targets(self.protocol.gossip_fanout, self._rng)
        if also is not None and all(p.peer_id != also.peer_id for p in targets):
            targets.append(also)
        if targets:
            self._flood = self.tasks.spawn(self._exchange_all(targets), name="spread")

    async def _exchange_all(self, peers: list[PeerInfo]) -> None:
        await asyncio.gather(*(self.gossip_with(p) for p in peers))

    async def gossip_with(
        self,
        peer: PeerInfo,
        timeout_s: float | None = None,
        events: list | None = None,
    ) -> bool:
        """One exchange with `peer` (`peer.gossip`); False if it did not answer within
        `timeout_s` (default `gossip_wait_s()`). The entries either side wants follow in a
        second message, bounded the same; its failure loses nothing that a later exchange
        does not bring. An answer whose table sum differs from ours is followed by a
        digest exchange, at most every `ANTI_ENTROPY_BEATS` heartbeats."""
        timeout_s = timeout_s or self.protocol.gossip_wait_s()
        if not await self._exchange(peer, self.gossip.request(events=events), timeout_s):
            return False
        self.membership.touch(peer.peer_id)
        now = time.monotonic()
        every_s = ANTI_ENTROPY_BEATS * self.protocol.heartbeat_interval_s
        if self.gossip.sum_differs and now - self._full_at >= every_s:
            self._full_at = now
            await self._anti_entropy(peer, timeout_s)
        self.spread_fresh()
        return True

    async def _anti_entropy(self, peer: PeerInfo, timeout_s: float) -> None:
        """Compare bucket sums with `peer`, then exchange digests of the buckets that differ
        (`peer.gossip`)."""
        sums = {"sums": self.membership.table_sums()}
        try:
            answer = await self.client.call(
                peer.address, "POST", "/gossip", sums, timeout_s=timeout_s
            )
            buckets = parse_buckets(answer.payload.get("buckets"))
        except ShoalError as exc:
            log.debug("[%s] anti-entropy with %s failed: %s", self.peer_id, peer.peer_id, exc)
            return
        if buckets:
            request = self.gossip.request(full=True, buckets=buckets)
            await self._exchange(peer, request, timeout_s)

    async def _exchange(self, peer: PeerInfo, request: dict[str, Any], timeout_s: float) -> bool:
        try:
            answer = await self.client.call(
                peer.address, "POST", "/gossip", request, timeout_s=timeout_s
            )
            push = self.gossip.take_answer(answer.payload, request)
        except ShoalError as exc:
            log.debug("[%s] gossip with %s failed: %s", self.peer_id, peer.peer_id, exc)
            return False
        if push is not None:
            try:
                final = await self.client.call(
                    peer.address, "POST", "/gossip", push, timeout_s=timeout_s
                )
                self.gossip.take_entries(final.payload)
            except ShoalError as exc:
                log.debug("[%s] push to %s failed: %s", self.peer_id, peer.peer_id, exc)
        return True

    async def announce(self) -> None:
        """Exchange with every live peer now, rather than at the next probes."""
        await asyncio.gather(*(self.gossip_with(p) for p in self.membership.live_others()))
