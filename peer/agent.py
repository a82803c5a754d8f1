"""The membership agent: joining a run, gossiping the peer table, knowing who is alive.

Messages (see `peer.membership` for the table and its liveness rules):
- `POST /join {peer, run}` → `{swarm_id, run, peers, round}`: a joiner introduces itself
  to any peer of the run; the answer refuses (409) a run config that differs and otherwise
  hands over the swarm id, the peer table and the run's round. The joiner retries an
  unreachable bootstrap for `join_timeout_s`.
- `POST /gossip {peers}` → `{peers}`: every `heartbeat_interval_s` the agent bumps its
  heartbeat and swaps tables with `gossip_fanout` random live peers, and probes one dead,
  not yet forgotten peer off the heartbeat path (not awaited: a dead host may hang it).
  A swap waits at most `gossip_wait_s()`.
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
from shoal.peer.errors import ProtocolError, ShoalError
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.runfiles import call_bootstrap
from shoal.peer.tasks import TaskOwner
from shoal.peer.wire import Envelope, WireCodec

log = logging.getLogger(__name__)


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
        self._probe: asyncio.Task | None = None

    @property
    def me(self) -> PeerInfo:
        return self.membership.me

    @property
    def peer_id(self) -> str:
        return self.membership.me.peer_id

    # ---- joining ---------------------------------------------------------------------

    async def join(self, bootstrap: str) -> int:
        """Introduce ourselves to the run through `bootstrap`; returns the run's round."""
        request = {"peer": self.me.to_wire(), "run": self.run.to_dict()}
        answer = await call_bootstrap(
            self.client, bootstrap, "/join", request, self.protocol.join_timeout_s
        )
        RunConfig.from_dict(answer.get("run", {})).check_same(self.run)
        self.wire.swarm_id = str(answer["swarm_id"])
        self.membership.merge(answer.get("peers"))
        return int(answer.get("round", 0))

    def welcome(self, envelope: Envelope) -> dict[str, Any]:
        """Answer a `/join` (server side): check the joiner's run config and entry, add it."""
        run = envelope.payload.get("run")
        if not isinstance(run, dict):
            raise ProtocolError("join needs the joiner's run config")
        RunConfig.from_dict(run).check_same(self.run)
        entry = PeerInfo.from_wire(envelope.payload.get("peer"))
        if entry.peer_id != envelope.sender:
            raise ProtocolError("join entry's peer_id differs from the sender")
        self.membership.merge([entry.to_wire()])
        log.info("[%s] %s joined from %s", self.peer_id, entry.peer_id, entry.address)
        return {
            "swarm_id": self.wire.swarm_id,
            "run": self.run.to_dict(),
            "peers": self.membership.table(),
            "round": self.current_round(),
        }

    async def wait_for_peers(self, count: int, timeout_s: float) -> None:
        """Wait until `count` peers (us included) are alive; ShoalError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        log.info("[%s] waiting for %d peers before training", self.peer_id, count)
        while len(self.membership.live_others()) + 1 < count:
            if time.monotonic() > deadline:
                alive = len(self.membership.live_others()) + 1
                raise ShoalError(
                    f"only {alive} of the {count} peers of --min-peers joined within "
                    f"{timeout_s:.0f} s (--min-peers-timeout)"
                )
            await asyncio.sleep(0.2)

    # ---- gossip ----------------------------------------------------------------------

    def gossip_answer(self, envelope: Envelope) -> dict[str, Any]:
        """Answer a `/gossip` (server side): merge theirs, return ours."""
        self.membership.merge(envelope.payload.get("peers"))
        return {"peers": self.membership.table()}

    def beat(self) -> None:
        self.before_beat(self.me)
        self.membership.beat()

    async def gossip_forever(self) -> None:
        interval = self.protocol.heartbeat_interval_s
        while True:
            self.beat()
            targets = self.membership.gossip_targets(self.protocol.gossip_fanout, self._rng)
            probe = self.membership.probe_target(self._rng)
            if probe is not None and (self._probe is None or self._probe.done()):
                self._probe = self.tasks.spawn(self.gossip_with(probe), name="probe")
            await asyncio.gather(*(self.gossip_with(p) for p in targets))
            await asyncio.sleep(interval)

    async def gossip_with(self, peer: PeerInfo, timeout_s: float | None = None) -> bool:
        """Swap tables with `peer`; False if it did not answer within `timeout_s` (default
        `gossip_wait_s()`)."""
        try:
            answer = await self.client.call(
                peer.address,
                "POST",
                "/gossip",
                {"peers": self.membership.table()},
                timeout_s=timeout_s or self.protocol.gossip_wait_s(),
            )
            self.membership.merge(answer.payload.get("peers"))
            return True
        except ShoalError as exc:
            log.debug("[%s] gossip with %s failed: %s", self.peer_id, peer.peer_id, exc)
            return False

    async def announce(self) -> None:
        """Swap tables with every live peer now, rather than at the next heartbeats."""
        await asyncio.gather(*(self.gossip_with(p) for p in self.membership.live_others()))
