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

from shoal.optim.inner import InnerConfig, InnerStats
from shoal.peer.errors import ShoalError, Stopped
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.statesync import download_state
from shoal.pipeline.checkfree import rebuild_stage, recovered_inner_config, recovery_source
from shoal.pipeline.compression import parse_activation
from shoal.pipeline.driver import DriverConfig, PipelineBroken, PipelineDriver
from shoal.pipeline.paths import PathPlanner, build_paths
from shoal.pipeline.routing import Router, build_router
from shoal.pipeline.service import StageService
from shoal.pipeline.stages import StagePlan, build_stage, stage_shapes
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


def pipeline_view(run: RunConfig, router: Router | None, paths: PathPlanner | None = None) -> dict[str, Any] | None:
    """The dashboard's picture of the run's pipeline: what each stage holds (and stage 0's
    router statistics and route policy when this peer drives one)."""
    if not run.stages:
        return None
    plan = StagePlan(run.stages, run.model["n_layers"])
    holds = ["embedding, head, loss"] + [f"blocks {b.start}–{b.stop - 1}" if len(b) > 1 else f"block {b.start}" for b in map(plan.blocks, range(1, run.stages))]
    view: dict[str, Any] = {"stages": run.stages, "holds": holds}
    if router is not None:
        view["router"] = router.snapshot()
    if paths is not None:
        view["routes"] = paths.describe()
    return view


# ---- CheckFree: rebuilding a stage that lost every peer ---------------------------------


NEVER = 2**62  # a standby's first_round: no round waits for its contribution


async def wait_for_lost_stage(peer: Peer, poll_s: float = 0.25) -> int:
    """`--standby`: watch the peer table until some stage of our activation codec (a block
    stage, or stage 0: then we become the replica's driver) has lost every peer, and return
    it. A stage counts as lost when all of its peers are dead in the table, or have been
    quiet for 1.5 heartbeats and fail a direct probe (then they are declared dead here, so
    the rebuild does not try them): a SIGKILLed peer is noticed in about 2 s instead of the
    table's `dead_after_s`. A stage that was never served is not lost (at the start of a
    run every stage is empty)."""
    membership, config = peer.membership, peer.config
    quiet_s = 1.5 * config.protocol.heartbeat_interval_s
    while not peer._stopping.is_set():
        for stage in range(config.run.stages):
            holders = [p for pid, p in membership.peers.items() if pid != peer.peer_id and p.role == "stage" and p.stage == stage
                       and p.activation == config.activation]
            if not holders:
                continue
            alive = [p for p in holders if membership.is_alive(p.peer_id)]
            quiet = [p for p in alive if membership.quiet_for(p.peer_id) >= quiet_s]
            if len(quiet) < len(alive):
                continue
            answered = await asyncio.gather(*(peer.gossip_with(p, timeout_s=1.0) for p in quiet))
            if not any(answered):
                for p in quiet:
                    membership.declare_dead(p.peer_id)
                return stage
        await asyncio.sleep(poll_s)
    raise Stopped()


async def rebuild_lost_stage(peer: Peer, model: ModelConfig) -> bool:
    """CheckFree (pipeline/checkfree.py) for a stage peer joining a stage that no live peer
    and no full replica holds: download the outer weights of the neighbouring block
    stages from their peers, average them weighted by the gradient norms those peers gossip
    (or copy the single block neighbour of an edge stage: CheckFree+), and start from that
    with fresh optimizer state (inner and outer) at lr × 1.1. Stage 0 is copied from the
    replica of it that the stage-1 peers keep (`refresh_stage0_copy`). False when the
    neighbours (or the copy) are gone too: the stage then starts from the run's initial
    weights, at the run's round and step."""
    me, run = peer.membership.me, peer.config.run
    if me.stage == 0:
        return await _rebuild_stage0(peer, model)
    plan = StagePlan(run.stages, model.n_layers)
    serving = [p for p in peer.membership.live_others() if p.role == "stage" and p.stage not in (None, me.stage) and p.activation is not None]
    mode, neighbours = recovery_source(plan, me.stage, [p.stage for p in serving])
    if mode == "none":
        log.warning("[%s] stage %d lost every peer and so did a neighbour: starting it from the run's initial weights", peer.peer_id, me.stage)
        await _start_fresh(peer, max((p.round for p in serving), default=0), max((p.step for p in serving), default=0))
        return False
    weights: dict[int, dict[str, torch.Tensor]] = {}
    norms: dict[int, float | None] = {}
    round_id = 0
    for stage in neighbours:
        sources = [p for p in serving if p.stage == stage]
        got_round, tensors, _ = await download_state(peer.client, sources, outer_shapes(model, plan, stage))
        weights[stage] = {name.removeprefix("outer/"): t for name, t in tensors.items()}
        reported = [p.grad_norm for p in sources if p.grad_norm is not None]
        norms[stage] = sum(reported) / len(reported) if reported else None
        round_id = max(round_id, got_round)
    prev, nxt = me.stage - 1, me.stage + 1
    rebuilt = rebuild_stage(plan, me.stage, weights.get(prev), weights.get(nxt), norms.get(prev), norms.get(nxt))
    step = max(p.step for p in serving if p.stage in neighbours)  # the run's inner step: no second warmup
    await peer._in_train(peer.restart_from, round_id, rebuilt, recovered_inner_config(run.inner), step)
    log.warning("[%s] stage %d had no live peer: rebuilt it from stage%s %s (CheckFree%s, gradient norms %s), round %d",
                peer.peer_id, me.stage, "s" if len(neighbours) > 1 else "", " and ".join(map(str, neighbours)),
                "" if mode == "average" else "+", [norms[n] for n in neighbours], round_id)
    return True


# Stage 0 (embedding, final norm, tied head) is the one slice no neighbour can stand in for:
# CheckFree+ keeps the (de)embedding on the neighbouring stage too. Here every stage-1 peer
# holds a copy of stage 0's outer weights, fetched from a stage-0 peer of its replica after
# each outer round and served with its own state under this prefix.
STAGE0_COPY = "stage0/"


def outer_shapes(model: ModelConfig, plan: StagePlan, stage: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of stage `stage`'s outer weights, as its peers' state serves them."""
    return {f"outer/{name}": shape for name, shape in stage_shapes(model, plan, stage).items()}


async def refresh_stage0_copy(peer: Peer, model: ModelConfig, round_id: int, attempts: int = 5,
                              pause_s: float = 0.5) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(stage 1) (round, weights): stage 0's outer weights of round `round_id` or later, named
    with `STAGE0_COPY`, from a live stage-0 peer of our replica; a stage-0 peer that has not
    published that round yet is asked again after `pause_s`. None when no stage-0 peer
    delivers it."""
    me, plan = peer.membership.me, StagePlan(peer.config.run.stages, model.n_layers)
    for attempt in range(attempts):
        sources = [peer.membership.peers[i] for i in stage_peers(peer.membership, 0, me.activation)]
        if not sources:
            return None
        try:
            got_round, tensors, _ = await download_state(peer.client, sources, outer_shapes(model, plan, 0), attempts=1)
        except ShoalError as exc:
            log.debug("[%s] stage 0 copy for round %d: %s", peer.peer_id, round_id, exc)
            got_round, tensors = -1, None
        if tensors is not None and got_round >= round_id:
            return got_round, {STAGE0_COPY + name: t for name, t in tensors.items()}
        if attempt + 1 < attempts:
            await asyncio.sleep(pause_s)
    return None


async def _rebuild_stage0(peer: Peer, model: ModelConfig) -> bool:
    """CheckFree+ for stage 0: copy it from a stage-1 peer's replica of it and continue as
    this replica's driver from the round after the stage peers' current one (they close
    the interrupted round with the steps they had), with fresh optimizer state."""
    activation = peer.config.activation
    replica = [p for p in peer.membership.live_others() if p.role == "stage" and p.activation == activation]
    round_id, step = max((p.round for p in replica), default=0) + 1, max((p.step for p in replica), default=0)
    holders = [p for p in replica if p.stage == 1]
    plan = StagePlan(peer.config.run.stages, model.n_layers)
    shapes = {STAGE0_COPY + name: shape for name, shape in outer_shapes(model, plan, 0).items()}
    try:
        if not holders:
            raise ShoalError("no live stage-1 peer")
        _, tensors, metadata = await download_state(peer.client, holders, shapes, attempts=2)
    except ShoalError as exc:
        log.warning("[%s] stage 0 lost every peer and no stage-1 peer delivered its copy (%s): starting it from the run's initial weights", peer.peer_id, exc)
        await _start_fresh(peer, round_id, step)
        return False
    weights = {name.removeprefix(STAGE0_COPY + "outer/"): t for name, t in tensors.items()}
    await peer._in_train(peer.restart_from, round_id, weights, recovered_inner_config(peer.config.run.inner), step)
    log.warning("[%s] stage 0 had no live peer: copied it from stage 1's replica of it (CheckFree+, its weights of round %s); driving from round %d",
                peer.peer_id, metadata.get(STAGE0_COPY + "round"), round_id)
    return True


async def _start_fresh(peer: Peer, round_id: int, step: int) -> None:
    """A lost stage with nothing to rebuild it from: the run's initial weights (what the
    peer built), but at the run's round and inner step, so that it serves the others'
    current microbatches."""
    await peer._in_train(peer.restart_from, round_id, dict(peer.outer.params), peer.config.run.inner, step)


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
        peer.stage_service = StageService(worker, stage, setting, model, compute, current_round, emulate_forward_s=config.emulate_forward_ms / 1000)
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
    peer.paths = build_paths(run.stages, config.skip_ratio, config.out_of_order, peer.peer_id, peer.router, config.skip_swaps, config.skip_keep,
                             config.skip_rescale)
    driver = PipelineDriver(edge, plan, setting.codec, peer.router, call, serving, compute, driver_config, name=peer.peer_id, paths=peer.paths)

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

    @property
    def last_grad_norm(self) -> float | None:
        return self.slice.last_grad_norm

    def restart(self, config: InnerConfig, step: int) -> None:
        self.slice.restart(config, step)

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
                    time.sleep(0.2)
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
        while seen < steps:
            now_seen = self.service.wait_steps(round_id, seen + 1, self.stopping)
            if self.stopping.is_set():
                raise Stopped()
            if now_seen == seen:  # the driver is in a later round: we joined late in this one
                break
            seen = now_seen
            if on_step is not None:
                on_step(self.worker.step_count, self._driver_loss())
        return InnerStats(steps=seen, tokens=self.service.tokens - tokens_before, seconds=time.perf_counter() - begin, train_loss=self._driver_loss())

    def _driver_loss(self) -> float:
        """The training loss stage 0 reported with its last step message."""
        return self.service.last_loss if self.service.last_loss is not None else float("nan")

    def evaluate(self, batches: Batches) -> None:
        return None  # a block stage cannot evaluate alone: stage 0 reports the replica's loss
