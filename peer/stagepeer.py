"""The round loop's view of a pipeline stage peer (`--role stage`).

`Peer` runs the same loop for every role: {inner steps → contribution → outer round →
apply}. What "inner steps" means is the trainer's business, and these two adapters give
stage peers the interface of `optim.inner.InnerTrainer` (`run`, `local_weights`,
`load_weights`, `params`, `evaluate`):

- `DriverTrainer` (stage 0): each inner step cuts a batch of its data into microbatches and
  drives them through the stage peers (`pipeline.driver`). It blocks the training thread
  while the event loop carries the hops; torch work runs on the driver's compute thread.
- `ServingTrainer` (stages 1..S−1): the stage serves hops as they come; an inner step is a
  `/stage/step` from the driver, so `run(H)` waits for H of them in the current round.

Stage peers of one slice average with each other and with the full replicas' same tensors
in the outer rounds; the pipeline's microbatches never cross a round boundary (a stage
answers a round-r forward only after applying round r−1).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from shoal.optim.inner import InnerStats
from shoal.peer.errors import Stopped
from shoal.peer.membership import Membership, PeerInfo
from shoal.pipeline.compression import parse_activation
from shoal.pipeline.driver import DriverConfig, PipelineBroken, PipelineDriver
from shoal.pipeline.paths import build_paths
from shoal.pipeline.routing import Router, build_router
from shoal.pipeline.service import StageService
from shoal.pipeline.stages import StagePlan, build_stage
from shoal.pipeline.worker import BlockWorker, EdgeWorker, SliceTrainer
from shoal.train.model import ModelConfig

if TYPE_CHECKING:
    from shoal.peer.config import RunConfig
    from shoal.peer.node import Peer

log = logging.getLogger(__name__)
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]


# ---- who holds what -------------------------------------------------------------------


def same_slice_as(peer: PeerInfo, me: PeerInfo) -> bool:
    """True if `peer` holds exactly our tensors (so our weights hashes must agree)."""
    return peer.role == me.role and (me.role != "stage" or peer.stage == me.stage)


def covers(peer: PeerInfo, me: PeerInfo) -> bool:
    """True if `peer`'s outer state includes ours (a source to download it from)."""
    return peer.role == "replica" or same_slice_as(peer, me)


def choose_stage(membership: Membership, num_stages: int) -> int:
    """The stage with the least capacity in the swarm: the fewest live stage peers, then
    the lowest measured throughput (tokens/s), then the lowest index."""
    if num_stages < 2:
        raise ValueError("--role stage needs a pipelined run (--stages S, S >= 2)")
    peers = [p for p in membership.live_others() if p.role == "stage" and p.stage is not None]

    def load(stage: int) -> tuple[int, float, int]:
        serving = [p for p in peers if p.stage == stage]
        return len(serving), sum(p.tokens_per_s or 0.0 for p in serving), stage

    return min(range(num_stages), key=load)


def stage_peers(membership: Membership, stage: int, activation: str) -> list[str]:
    """Live peers serving `stage` with our replica's activation codec."""
    return sorted(p.peer_id for p in membership.live_others() if p.role == "stage" and p.stage == stage and p.activation == activation)


def pipeline_view(run: RunConfig, router: Router | None) -> dict[str, Any] | None:
    """The dashboard's picture of the run's pipeline: what each stage holds (and stage 0's
    router statistics when this peer drives one)."""
    if not run.stages:
        return None
    plan = StagePlan(run.stages, run.model["n_layers"])
    holds = ["embedding, head, loss"] + [f"blocks {b.start}–{b.stop - 1}" if len(b) > 1 else f"block {b.start}" for b in map(plan.blocks, range(1, run.stages))]
    view: dict[str, Any] = {"stages": run.stages, "holds": holds}
    if router is not None:
        view["router"] = router.snapshot()
    return view


# ---- building a stage peer's trainer ----------------------------------------------------


def build_stage_trainer(peer: Peer, model: ModelConfig, stage: int) -> DriverTrainer | ServingTrainer:
    """Stage `stage`'s slice of the model and the trainer that feeds the round loop
    (called on the training thread, after the peer joined)."""
    config, run = peer.config, peer.config.run
    plan = StagePlan(run.stages, model.n_layers)
    if not 0 <= stage < run.stages:
        raise ValueError(f"--stage {stage} is out of range 0..{run.stages - 1}")
    setting = parse_activation(config.activation, model, run.seed)
    module = build_stage(model, plan, stage, run.seed, peer.device)
    compute = ThreadPoolExecutor(1, thread_name_prefix=f"stage-{peer.peer_id}")
    current_round: Callable[[], int] = lambda: peer.outer_round  # noqa: E731
    if stage > 0:
        worker = BlockWorker(module, run.inner, peer.device, setting.basis)
        peer.stage_service = StageService(worker, stage, setting, model, compute, current_round)
        return ServingTrainer(worker, peer.stage_service, current_round, peer._stopping)
    edge = EdgeWorker(module, run.inner, peer.device, setting.basis)
    peer.router = build_router(config.router, seed=run.seed)

    async def call(peer_id: str, path: str, payload: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        target = peer.membership.peers.get(peer_id)
        if target is None:
            raise PipelineBroken(f"peer {peer_id} left the table")
        return (await peer.client.call(target.address, "POST", path, payload, timeout_s=timeout_s)).payload

    def serving(stage: int) -> list[str]:
        return stage_peers(peer.membership, stage, config.activation)

    driver_config = DriverConfig(microbatch_size=config.microbatch_size, max_in_flight=config.in_flight, hop_timeout_s=config.protocol.request_timeout_s)
    paths = build_paths(run.stages, config.skip_ratio, config.out_of_order, peer.peer_id, peer.router)
    driver = PipelineDriver(edge, plan, setting.codec, peer.router, call, serving, compute, driver_config, name=peer.peer_id, paths=paths)

    def ready() -> bool:
        return all(serving(s) for s in range(1, run.stages))

    return DriverTrainer(edge, driver, peer.batches, lambda: peer._loop, current_round, peer._stopping, ready, config.eval_stages)


class _SliceView:
    """What the round loop reads and writes of a stage's slice (its SliceTrainer)."""

    def __init__(self, trainer: SliceTrainer) -> None:
        self.slice = trainer
        self.params = trainer.params
        self.model = trainer.module

    @property
    def step_count(self) -> int:
        return self.slice.step_count

    def local_weights(self) -> dict[str, torch.Tensor]:
        return self.slice.local_weights()

    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        self.slice.load_weights(weights)


class DriverTrainer(_SliceView):
    def __init__(self, edge: EdgeWorker, driver: PipelineDriver, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                 loop: Callable[[], asyncio.AbstractEventLoop], current_round: Callable[[], int], stopping: threading.Event,
                 stage_ready: Callable[[], bool], eval_stages: Sequence[int] | None = None) -> None:
        super().__init__(edge)
        self.edge, self.driver, self.batches = edge, driver, batches
        self.loop, self.current_round, self.stopping, self.stage_ready = loop, current_round, stopping, stage_ready
        self.eval_stages = eval_stages
        self.partial_eval_loss: float | None = None  # last held-out loss through eval_stages only

    def _await(self, coroutine) -> Any:
        """Run `coroutine` on the event loop and wait for it (training thread); cancel it
        and raise Stopped when the peer stops."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop())
        while True:
            try:
                return future.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                if self.stopping.is_set():
                    future.cancel()
                    raise Stopped() from None

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self._await(call())

    def _wait_for_stages(self) -> None:
        while not self._on_loop(self.stage_ready):
            if self.stopping.is_set():
                raise Stopped()
            time.sleep(0.2)

    def run(self, steps: int, on_step: Callable[[int, float], None] | None = None) -> InnerStats:
        begin, losses, tokens = time.perf_counter(), [], 0
        self.driver.round = self.current_round()
        for _ in range(steps):
            x, y = next(self.batches)
            while True:
                self._wait_for_stages()
                try:
                    result = self._await(self.driver.train_step(x, y, self.edge.step_count))
                    break
                except PipelineBroken as exc:
                    log.warning("[%s] step %d: %s; waiting for every stage to be served", self.driver.name, self.edge.step_count, exc)
                    time.sleep(1.0)
            losses.append(result.loss)
            tokens += result.tokens
            if on_step is not None:
                on_step(self.edge.step_count, result.loss)
        mean = sum(losses) / len(losses) if losses else float("nan")
        return InnerStats(steps=steps, tokens=tokens, seconds=time.perf_counter() - begin, train_loss=mean)

    def evaluate(self, batches: Batches) -> float | None:
        """Held-out loss through the pipeline; None while some stage has no peer. With
        `eval_stages`, also the loss through those stages alone (`partial_eval_loss`)."""
        if not self._on_loop(self.stage_ready):
            return None
        self.driver.round = self.current_round()
        if self.eval_stages:
            self.partial_eval_loss = self._await(self.driver.evaluate(batches, self.eval_stages))
        return self._await(self.driver.evaluate(batches))


class ServingTrainer(_SliceView):
    def __init__(self, worker: BlockWorker, service: StageService, current_round: Callable[[], int], stopping: threading.Event) -> None:
        super().__init__(worker)
        self.worker, self.service, self.current_round, self.stopping = worker, service, current_round, stopping

    def run(self, steps: int, on_step: Callable[[int, float], None] | None = None) -> InnerStats:
        begin, tokens_before, round_id, seen = time.perf_counter(), self.service.tokens, self.current_round(), 0
        while seen < steps and not self.stopping.is_set():
            seen = self.service.wait_steps(round_id, seen + 1, self.stopping)
            if on_step is not None:  # raises Stopped when the peer stops
                on_step(self.worker.step_count, self._driver_loss())
        return InnerStats(steps=seen, tokens=self.service.tokens - tokens_before, seconds=time.perf_counter() - begin, train_loss=self._driver_loss())

    def _driver_loss(self) -> float:
        """The training loss stage 0 reported with its last step message."""
        return self.service.last_loss if self.service.last_loss is not None else float("nan")

    def evaluate(self, batches: Batches) -> None:
        return None  # a block stage cannot evaluate alone: stage 0 reports the replica's loss
