"""CheckFree's one home: finding a pipeline stage that lost every peer and rebuilding it.

- A `--standby` peer watches the table (`wait_for_lost_stage`) until some stage of its
  activation codec has lost every peer: all of its peers dead in the table, or quiet for
  `probe_quiet_heartbeats` heartbeats and failing a direct probe (then declared dead here,
  so the rebuild does not try them: a SIGKILLed peer is noticed in about 2 s instead of the
  table's `dead_after_s`). A stage that was never served is not lost.
- A peer that takes a lost block stage rebuilds it (`rebuild`, pipeline/checkfree.py):
  the outer weights of the neighbouring block stages, averaged by the gradient norms their
  peers gossip (or the single block neighbour of an edge stage, CheckFree+), with fresh
  optimizer state at lr × 1.1, at the run's round and inner step.
- Stage 0 (embedding, final norm, tied head) has no neighbour to stand in for it: every
  stage-1 peer keeps a copy of stage 0's outer weights, fetched after each round
  (`fetch_stage0_copy`) and served with its own state under `STAGE0_COPY`; a peer taking
  over stage 0 copies it and drives from the next round.
When there is nothing to rebuild from, the stage starts from the run's initial weights at
the run's round and step, so that it serves the others' current microbatches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping

import torch

from shoal.optim.inner import InnerConfig
from shoal.peer.agent import MembershipAgent
from shoal.peer.client import PeerClient
from shoal.peer.config import ProtocolConfig, RunConfig
from shoal.peer.errors import ShoalError, Stopped
from shoal.peer.holders import stage_peers
from shoal.peer.membership import PeerInfo
from shoal.peer.statesync import download_state
from shoal.pipeline.checkfree import rebuild_stage, recovered_inner_config, recovery_source
from shoal.pipeline.stages import StagePlan, stage_shapes
from shoal.train.model import ModelConfig

log = logging.getLogger(__name__)

STAGE0_COPY = "stage0/"  # names of stage 0's weights as a stage-1 peer serves them
# (round, weights, inner config, inner step) → the peer continues from there
Restart = Callable[[int, Mapping[str, torch.Tensor], InnerConfig, int], Awaitable[None]]


def outer_shapes(model: ModelConfig, plan: StagePlan, stage: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of stage `stage`'s outer weights, as its peers' state serves them."""
    return {f"outer/{name}": shape for name, shape in stage_shapes(model, plan, stage).items()}


class StageRecovery:
    def __init__(
        self,
        agent: MembershipAgent,
        client: PeerClient,
        run: RunConfig,
        activation: str,
        protocol: ProtocolConfig,
        stopping: threading.Event,
    ) -> None:
        self.agent, self.client, self.run, self.activation = agent, client, run, activation
        self.protocol, self.stopping = protocol, stopping
        self.model = ModelConfig.from_dict(run.model)
        self.plan = StagePlan(run.stages, self.model.n_layers) if run.stages else None

    @property
    def peer_id(self) -> str:
        return self.agent.peer_id

    async def wait_for_lost_stage(self, poll_s: float = 0.25) -> int:
        """(`--standby`) The first stage of our activation codec that lost every peer."""
        membership = self.agent.membership
        quiet_s = self.protocol.probe_quiet_heartbeats * self.protocol.heartbeat_interval_s
        while not self.stopping.is_set():
            for stage in range(self.run.stages):
                holders = [
                    p
                    for pid, p in membership.peers.items()
                    if pid != self.peer_id
                    and p.role == "stage"
                    and p.stage == stage
                    and p.activation == self.activation
                ]
                if not holders:
                    continue
                alive = [p for p in holders if membership.is_alive(p.peer_id)]
                quiet = [p for p in alive if membership.quiet_for(p.peer_id) >= quiet_s]
                if len(quiet) < len(alive):
                    continue
                timeout_s = self.protocol.probe_timeout_s
                answered = await asyncio.gather(
                    *(self.agent.gossip_with(p, timeout_s=timeout_s) for p in quiet)
                )
                if not any(answered):
                    for p in quiet:
                        membership.declare_dead(p.peer_id)
                    return stage
            await asyncio.sleep(poll_s)
        raise Stopped()

    async def rebuild(
        self, stage: int, restart: Restart, initial: Mapping[str, torch.Tensor]
    ) -> bool:
        """Rebuild `stage` (no live peer and no full replica holds it) and `restart` from
        it; `initial` are the run's initial weights of the stage (the fallback). False when
        there was nothing to rebuild from."""
        if stage == 0:
            return await self._copy_stage0(restart, initial)
        assert self.plan is not None
        serving = [
            p
            for p in self.agent.membership.live_others()
            if p.role == "stage" and p.stage not in (None, stage) and p.activation is not None
        ]
        mode, neighbours = recovery_source(self.plan, stage, [p.stage for p in serving])
        if mode == "none":
            log.warning(
                "[%s] stage %d lost every peer and so did a neighbour: starting it from "
                "the run's initial weights",
                self.peer_id,
                stage,
            )
            await self._start_fresh(restart, initial, serving, round_offset=0)
            return False
        weights: dict[int, dict[str, torch.Tensor]] = {}
        norms: dict[int, float | None] = {}
        round_id = 0
        for neighbour in neighbours:
            sources = [p for p in serving if p.stage == neighbour]
            shapes = outer_shapes(self.model, self.plan, neighbour)
            got_round, tensors, _ = await download_state(
                self.client, sources, shapes, attempts=self.protocol.state_download_attempts
            )
            weights[neighbour] = {name.removeprefix("outer/"): t for name, t in tensors.items()}
            reported = [p.grad_norm for p in sources if p.grad_norm is not None]
            norms[neighbour] = sum(reported) / len(reported) if reported else None
            round_id = max(round_id, got_round)
        step = max(p.step for p in serving if p.stage in neighbours)  # no second warmup
        if round_id == 0:  # lost before the first outer step: its initial weights are exact
            await restart(0, dict(initial), self.run.inner, step)
            log.warning(
                "[%s] stage %d lost in round 0: restarted it from the run's initial weights",
                self.peer_id,
                stage,
            )
            return False
        prev, nxt = stage - 1, stage + 1
        rebuilt = rebuild_stage(
            self.plan, stage, weights.get(prev), weights.get(nxt), norms.get(prev), norms.get(nxt)
        )
        await restart(round_id, rebuilt, recovered_inner_config(self.run.inner), step)
        log.warning(
            "[%s] stage %d had no live peer: rebuilt it from stage%s %s (CheckFree%s, gradient "
            "norms %s), round %d",
            self.peer_id,
            stage,
            "s" if len(neighbours) > 1 else "",
            " and ".join(map(str, neighbours)),
            "" if mode == "average" else "+",
            [norms[n] for n in neighbours],
            round_id,
        )
        return True

    async def fetch_stage0_copy(self, round_id: int) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(stage 1) (round, weights): stage 0's outer weights of round `round_id` or later,
        named with `STAGE0_COPY`, from a live stage-0 peer of our replica; a stage-0 peer
        that has not published that round yet is asked again after `stage0_copy_pause_s`.
        None when no stage-0 peer delivers it."""
        assert self.plan is not None
        membership, attempts = self.agent.membership, self.protocol.stage0_copy_attempts
        for attempt in range(attempts):
            ids = stage_peers(membership, 0, self.activation)
            if not ids:
                return None
            sources = [membership.peers[i] for i in ids]
            try:
                shapes = outer_shapes(self.model, self.plan, 0)
                got_round, tensors, _ = await download_state(
                    self.client, sources, shapes, attempts=1
                )
            except ShoalError as exc:
                log.debug("[%s] stage 0 copy for round %d: %s", self.peer_id, round_id, exc)
                got_round, tensors = -1, None
            if tensors is not None and got_round >= round_id:
                return got_round, {STAGE0_COPY + name: t for name, t in tensors.items()}
            if attempt + 1 < attempts:
                await asyncio.sleep(self.protocol.stage0_copy_pause_s)
        return None

    async def _copy_stage0(self, restart: Restart, initial: Mapping[str, torch.Tensor]) -> bool:
        """Copy stage 0 from a stage-1 peer's replica of it and drive from the round after
        the stage peers' current one (they close the interrupted round with the steps they
        had), with fresh optimizer state."""
        assert self.plan is not None
        replica = [
            p
            for p in self.agent.membership.live_others()
            if p.role == "stage" and p.activation == self.activation
        ]
        holders = [p for p in replica if p.stage == 1]
        shapes = {
            STAGE0_COPY + name: shape
            for name, shape in outer_shapes(self.model, self.plan, 0).items()
        }
        try:
            if not holders:
                raise ShoalError("no live stage-1 peer")
            _, tensors, metadata = await download_state(self.client, holders, shapes, attempts=2)
        except ShoalError as exc:
            log.warning(
                "[%s] stage 0 lost every peer and no stage-1 peer delivered its copy "
                "(%s): starting it from the run's initial weights",
                self.peer_id,
                exc,
            )
            await self._start_fresh(restart, initial, replica, round_offset=1)
            return False
        round_id = max((p.round for p in replica), default=0) + 1
        step = max((p.step for p in replica), default=0)
        weights = {name.removeprefix(STAGE0_COPY + "outer/"): t for name, t in tensors.items()}
        await restart(round_id, weights, recovered_inner_config(self.run.inner), step)
        log.warning(
            "[%s] stage 0 had no live peer: copied it from stage 1's replica of it "
            "(CheckFree+, its weights of round %s); driving from round %d",
            self.peer_id,
            metadata.get(STAGE0_COPY + "round"),
            round_id,
        )
        return True

    async def _start_fresh(
        self,
        restart: Restart,
        initial: Mapping[str, torch.Tensor],
        others: list[PeerInfo],
        round_offset: int,
    ) -> None:
        """The run's initial weights, but at the run's round and inner step."""
        round_id = max((p.round for p in others), default=0) + round_offset
        step = max((p.step for p in others), default=0)
        await restart(round_id, dict(initial), self.run.inner, step)
