"""Roles: what a peer trains and serves, as strategy objects the round engine calls.

- `ReplicaRole`: the whole model (`optim.inner.InnerTrainer`).
- `BlockStageRole`: stage s ≥ 1 of a pipeline replica: serves `/stage/*` hops through a
  `StageService` and counts the driver's steps as its inner steps (`ServingTrainer`);
  stage 1 also keeps a copy of stage 0's weights after every round (CheckFree+).
- `DriverRole`: stage 0 (embedding, head, loss, the data): drives microbatches through
  the stage peers (`DriverTrainer`).
A standby is not a role: it waits (`StageRecovery.wait_for_lost_stage`) and then takes
the stage role of the stage it took over.

Each role builds its trainer on the training thread, says whose state covers its own,
and hooks into the round: `on_applied` after the outer step, `after_round` once the round
is published. Roles get what they use in a `PeerContext`; none reaches into the peer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shoal.optim.inner import InnerTrainer
from shoal.peer.agent import MembershipAgent
from shoal.peer.client import PeerClient
from shoal.peer.config import PeerConfig
from shoal.peer.holders import stage_holdings, stage_peers
from shoal.peer.publisher import StatePublisher
from shoal.peer.ranks import RankedTrainer, start_ranks
from shoal.peer.recovery import STAGE0_COPY, StageRecovery
from shoal.peer.stage_trainers import DriverTrainer, ServingTrainer
from shoal.peer.tasks import TaskOwner
from shoal.peer.trainthread import TrainingThread, worker_pool
from shoal.pipeline.compression import parse_activation
from shoal.pipeline.driver import DriverConfig, PipelineBroken, PipelineDriver
from shoal.pipeline.paths import build_paths
from shoal.pipeline.routing import build_router
from shoal.pipeline.service import StageService
from shoal.pipeline.stages import StagePlan, build_stage
from shoal.pipeline.subspace import confine_module
from shoal.pipeline.worker import BlockWorker, EdgeWorker
from shoal.train import build_model
from shoal.train.model import ModelConfig

log = logging.getLogger(__name__)
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Progress:
    """Where this peer's training stands: written by the round engine, read by the rest."""

    round: int = 0


@dataclass
class PeerContext:
    """The parts of a peer that roles and the round engine work with."""

    config: PeerConfig
    client: PeerClient
    agent: MembershipAgent
    thread: TrainingThread
    tasks: TaskOwner
    publisher: StatePublisher
    recovery: StageRecovery
    progress: Progress
    device: torch.device
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
    eval_set: Batches

    @property
    def peer_id(self) -> str:
        return self.config.peer_id

    def current_round(self) -> int:
        return self.progress.round


class Role:
    kind = "replica"
    stage: int | None = None
    stage_service: StageService | None = None

    def __init__(self, ctx: PeerContext) -> None:
        self.ctx = ctx

    def build_trainer(self, model: ModelConfig) -> Any:
        """The trainer of what this role holds (training thread)."""
        raise NotImplementedError

    def on_applied(self) -> None:
        """The outer step of a round was applied (event loop)."""

    async def after_round(self, round_id: int) -> None:
        """Round `round_id`'s state is published (event loop; awaited by nobody)."""

    def pipeline_view(self) -> dict[str, Any] | None:
        return stage_holdings(self.ctx.config.run)

    def report(self) -> dict[str, Any]:
        return {}

    def devices(self) -> str:
        """What trains, for the dashboard: the device (with --nproc: how many, and how)."""
        return str(self.ctx.device)

    def close(self) -> None:
        """Release what the role started (event loop, after the training thread stopped)."""


class ReplicaRole(Role):
    ranked: RankedTrainer | None = None  # with --nproc > 1: rank 0's side of the peer's ranks

    def build_trainer(self, model: ModelConfig) -> InnerTrainer | RankedTrainer:
        ctx, run = self.ctx, self.ctx.config.run
        schedule = ctx.config.schedule
        module = build_model(model, seed=run.seed)
        module.checkpoint_activations = schedule.checkpoint_activations
        # --activation subspace:R on a full replica: train it as a compressed pipeline
        # replica would (weights confined), to compare against compressing every replica
        basis = parse_activation(ctx.config.pipeline.activation, model, run.seed).basis
        confined = confine_module(module, basis) if basis is not None else None
        if schedule.nproc > 1:
            if confined is not None:
                raise ValueError("--nproc > 1 does not take --activation subspace on a replica")
            self.ranked = start_ranks(ctx, module)
            return self.ranked
        return InnerTrainer(
            module, run.inner, ctx.batches, ctx.device, confined, compile=schedule.compile
        )

    def devices(self) -> str:
        if self.ranked is None:
            return super().devices()
        how = "FSDP2" if self.ranked.shard == "fsdp" else "DDP"
        return f"{self.ranked.world} x {self.ctx.device.type} ({how})"

    def close(self) -> None:
        if self.ranked is not None:
            self.ranked.close()


class _StageRole(Role):
    kind = "stage"

    def __init__(self, ctx: PeerContext, stage: int) -> None:
        super().__init__(ctx)
        run = ctx.config.run
        if not 0 <= stage < run.stages:
            raise ValueError(f"--stage {stage} is out of range 0..{run.stages - 1}")
        self.stage = stage
        self.plan = StagePlan(run.stages, ModelConfig.from_dict(run.model).n_layers)
        # torch and codec work of the stage's hops, in arrival order
        self.compute = worker_pool(1, f"stage-{ctx.peer_id}", ctx.config.schedule.compute_nice)

    def close(self) -> None:
        self.compute.shutdown(wait=False, cancel_futures=True)


class BlockStageRole(_StageRole):
    def build_trainer(self, model: ModelConfig) -> ServingTrainer:
        ctx, run, pipeline = self.ctx, self.ctx.config.run, self.ctx.config.pipeline
        setting = parse_activation(pipeline.activation, model, run.seed)
        module = build_stage(model, self.plan, self.stage, run.seed, ctx.device)
        protocol = ctx.config.protocol
        worker = BlockWorker(
            module, run.inner, ctx.device, setting.basis, saved_ttl_s=protocol.saved_input_ttl_s
        )
        self.stage_service = StageService(
            worker,
            self.stage,
            setting,
            model,
            self.compute,
            ctx.current_round,
            round_wait_s=protocol.stage_round_wait_s,
            emulate_forward_s=pipeline.emulate_forward_ms / 1000,
        )
        return ServingTrainer(worker, self.stage_service, ctx.current_round, ctx.thread)

    def on_applied(self) -> None:
        assert self.stage_service is not None
        self.stage_service.round_applied()

    async def after_round(self, round_id: int) -> None:
        """(stage 1) Fetch stage 0's outer weights of this round and serve them with our
        state (CheckFree+: a peer that takes over a lost stage 0 copies them from us)."""
        if self.stage != 1:
            return
        fetched = await self.ctx.recovery.fetch_stage0_copy(round_id)
        if fetched is None:
            log.debug(
                "[%s] no stage-0 peer delivered its weights of round %d; keeping the "
                "copy of an earlier round",
                self.ctx.peer_id,
                round_id,
            )
            return
        copy_round, tensors = fetched
        if not self.ctx.publisher.has_extra:
            log.info(
                "[%s] keeping a copy of stage 0's weights (CheckFree+), refreshed every round",
                self.ctx.peer_id,
            )
        self.ctx.publisher.set_extra(tensors, {STAGE0_COPY + "round": copy_round})


class DriverRole(_StageRole):
    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx, 0)
        self.driver: PipelineDriver | None = None

    def serving(self, stage: int) -> list[str]:
        return stage_peers(self.ctx.agent.membership, stage, self.ctx.config.pipeline.activation)

    def missing_stages(self) -> list[int]:
        return [s for s in range(1, self.plan.num_stages) if not self.serving(s)]

    async def call(
        self, peer_id: str, path: str, payload: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        target = self.ctx.agent.membership.peers.get(peer_id)
        if target is None:
            raise PipelineBroken(f"peer {peer_id} left the table")
        answer = await self.ctx.client.call(
            target.address, "POST", path, payload, timeout_s=timeout_s
        )
        return answer.payload

    def build_trainer(self, model: ModelConfig) -> DriverTrainer:
        ctx, run, pipeline, protocol = (
            self.ctx,
            self.ctx.config.run,
            self.ctx.config.pipeline,
            self.ctx.config.protocol,
        )
        setting = parse_activation(pipeline.activation, model, run.seed)
        module = build_stage(model, self.plan, 0, run.seed, ctx.device)
        edge = EdgeWorker(module, run.inner, ctx.device, setting.basis)
        self.router = build_router(
            pipeline.router,
            seed=run.seed,
            ban_s=protocol.router_ban_s,
            max_ban_s=protocol.router_max_ban_s,
        )
        self.paths = build_paths(
            run.stages,
            pipeline.skip_ratio,
            pipeline.out_of_order,
            ctx.peer_id,
            self.router,
            pipeline.skip_swaps,
            pipeline.skip_keep,
            pipeline.skip_rescale,
        )
        driver_config = DriverConfig(
            microbatch_size=pipeline.microbatch_size,
            max_in_flight=pipeline.in_flight,
            hop_timeout_s=protocol.request_timeout_s,
            max_attempts=protocol.hop_max_attempts,
            retry_pause_s=protocol.hop_retry_pause_s,
        )
        self.driver = PipelineDriver(
            edge,
            self.plan,
            setting.codec,
            self.router,
            self.call,
            self.serving,
            self.compute,
            driver_config,
            name=ctx.peer_id,
            paths=self.paths,
        )
        return DriverTrainer(
            edge,
            self.driver,
            ctx.batches,
            ctx.thread,
            ctx.current_round,
            self.missing_stages,
            protocol.pipeline_stall_timeout_s,
            pipeline.eval_stages,
        )

    def pipeline_view(self) -> dict[str, Any] | None:
        view = super().pipeline_view()
        if view is not None and self.driver is not None:
            view["router"] = self.router.snapshot()
            view["routes"] = self.paths.describe()
        return view

    def report(self) -> dict[str, Any]:
        if self.driver is None:
            return {}
        return {
            "pipeline": {
                "microbatch_retries": self.driver.retries_total,
                "hop_failovers": self.driver.failovers_total,
                "router": self.router.snapshot(),
                "routes": self.paths.describe(),
            }
        }


def make_role(ctx: PeerContext, stage: int | None) -> Role:
    """The role of a peer of `ctx.config.pipeline.role`, serving `stage` if a stage peer."""
    if ctx.config.pipeline.role == "replica":
        return ReplicaRole(ctx)
    assert stage is not None, "a stage peer's stage is chosen before its role is built"
    return DriverRole(ctx) if stage == 0 else BlockStageRole(ctx, stage)
