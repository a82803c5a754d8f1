"""A peer: the orchestrator that wires membership, outer rounds, state sync, the training
thread and the HTTP server together.

Threads: the asyncio event loop serves HTTP, gossips and runs the round protocol; all
torch work (inner steps, encoding our contribution, the outer step, evaluation) runs on
one dedicated training thread, and decoding others' contributions on the default
executor. The loop never runs torch work, so heartbeats keep flowing while we train.

Life of a peer: start the server → join through `--bootstrap` (check the run config,
take the peer table, download the current outer state) or start a new run → repeat
{H inner steps → publish → gather → agree → outer step → evaluate → verify hash →
checkpoint} → on stop, leave the server up for `linger_s` so that others finish the round.
With NoLoCo the middle is {publish → fetch one random partner's contribution, waiting at
most `partner_timeout_s` → outer step}; with Streaming DiLoCo each round's exchange runs
while the next round's first τ inner steps train.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from aiohttp import web

from shoal.optim.inner import InnerConfig, InnerTrainer
from shoal.optim.outer import weights_hash
from shoal.optim.registry import build_outer
from shoal.peer.checkpoint import load_latest, save_checkpoint
from shoal.peer.client import PeerClient, PeerUnreachable, Traffic
from shoal.peer.config import PeerConfig, RunConfig
from shoal.peer.errors import ConfigMismatch, ShoalError, Stopped
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.rounds import RoundExchange, RoundStore
from shoal.peer.server import make_app
from shoal.peer.stagepeer import (
    NEVER,
    STAGE0_COPY,
    build_stage_trainer,
    choose_stage,
    covers,
    pipeline_view,
    rebuild_lost_stage,
    refresh_stage0_copy,
    same_slice_as,
    wait_for_lost_stage,
)
from shoal.peer.statesync import StateServer, download_state
from shoal.peer.wire import WireCodec
from shoal.pipeline.compression import parse_activation
from shoal.pipeline.paths import PathPlanner
from shoal.pipeline.routing import Router
from shoal.pipeline.service import StageService
from shoal.pipeline.stages import StagePlan
from shoal.pipeline.subspace import confine_module
from shoal.train import ByteData, build_model, load_corpus, parameter_names, resolve_device

log = logging.getLogger(__name__)


class Peer:
    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.peer_id = config.peer_id
        protocol = config.protocol
        self.traffic = Traffic()
        self.wire = WireCodec(
            config.peer_id,
            config.swarm_id or secrets.token_hex(8),
            config.swarm_key,
            max_body_bytes=protocol.max_request_bytes,
            max_clock_skew_s=protocol.max_clock_skew_s,
        )
        self.client = PeerClient(self.wire, self.traffic, request_timeout_s=protocol.request_timeout_s, max_response_bytes=protocol.max_response_bytes)
        self.store = RoundStore(protocol.rounds_kept)
        self.state_server = StateServer(protocol.state_chunk_bytes)
        self.membership: Membership  # after start(), when our address is known
        self.outer_round = 0
        self.address = ""
        self.finished = asyncio.Event()
        self._stopping = threading.Event()
        self._train_thread = ThreadPoolExecutor(1, thread_name_prefix=f"train-{self.peer_id}")
        self._checkpoint_thread = ThreadPoolExecutor(1, thread_name_prefix=f"ckpt-{self.peer_id}")  # in order
        self._tasks: list[asyncio.Task] = []
        self._probe: asyncio.Task | None = None  # gossip with a peer believed dead (membership.probe_target)
        self._runner: web.AppRunner | None = None
        self._rng = random.Random(secrets.randbits(64))
        self.round_log: list[dict[str, Any]] = []  # one entry per applied round (tests, demo)
        self.initial_eval_loss: float | None = None
        self.error: BaseException | None = None  # what ended the training loop, if not a stop
        self.train_started_at: float | None = None  # wall clock of the first inner step
        self.inner_seconds_total = 0.0
        self.longest_stall_s = 0.0
        self.eval_seconds_total = 0.0
        self._last_inner_end: float | None = None
        self.stage_service: StageService | None = None  # --role stage, stages 1..S−1
        self.router: Router | None = None  # --role stage, stage 0
        self.paths: PathPlanner | None = None  # --role stage, stage 0
        self._state_snapshot: dict[str, torch.Tensor] = {}  # what _publish_state last froze
        self._stage0_copy: tuple[int, dict[str, torch.Tensor]] | None = None  # stage 1: (round, stage 0's outer weights), CheckFree+
        self._partner_wait_s: float | None = None  # NoLoCo: how long the last step waited for its partner

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self, train: bool = True) -> None:
        """Build the model, serve, join or found the run, and start training (unless
        `train` is False: then the peer only serves and gossips). A stage peer without
        `--stage` picks its stage from the swarm's table, so it joins before building."""
        self._loop = asyncio.get_running_loop()
        await self._in_train(self._build_data)
        self._runner = web.AppRunner(make_app(self), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.listen_host, self.config.listen_port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.address = self.config.advertise or f"http://{self.config.listen_host}:{port}"
        protocol = self.config.protocol
        me = PeerInfo(self.peer_id, self.address, self.config.role, incarnation=time.time(), stage=self.config.stage)
        self.membership = Membership(me, suspect_after_s=protocol.suspect_after_s, dead_after_s=protocol.dead_after_s)
        await self.client.start()
        joined_round = await self._join(self.config.bootstrap) if self.config.bootstrap else 0
        if self.config.standby:  # gossip (so that we stay known) and wait for a stage to be lost
            me.first_round = NEVER
            self._tasks.append(asyncio.create_task(self._gossip_loop()))
            log.info("[%s] standing by to take over a pipeline stage that loses every peer", self.peer_id)
            # the first model build imports about a second of torch internals: pay it now, not during a takeover
            await self._in_train(build_model, self.config.run.model_preset, self.config.run.seed, "meta")
            me.stage = await wait_for_lost_stage(self)
            joined_round = max((p.round for p in self.membership.live_others()), default=0)
            log.warning("[%s] stage %d lost every peer: taking it over", self.peer_id, me.stage)
        elif self.config.role == "stage" and me.stage is None:
            me.stage = choose_stage(self.membership, self.config.run.stages)
            log.info("[%s] serving pipeline stage %d (the least served)", self.peer_id, me.stage)
        await self._in_train(self._build_trainer)
        if joined_round > 0:  # the run has moved on from the shared initial weights
            await self._catch_up(me)
        if self.config.role == "stage":  # built and in step: drivers may route to us from now on
            me.activation = self.config.activation
        self._publish_state()
        me.round = me.first_round = self.outer_round
        me.eval_loss = self.initial_eval_loss = await self._in_train(self._evaluate)
        self.membership.beat()
        log.info("[%s] serving %s (swarm %s, round %d)", self.peer_id, self.address, self.wire.swarm_id, self.outer_round)
        if self.config.standby:  # tell everyone at once rather than at the next heartbeats
            await asyncio.gather(*(self.gossip_with(p) for p in self.membership.live_others()))
        else:
            self._tasks.append(asyncio.create_task(self._gossip_loop()))
        if train:
            self._tasks.append(asyncio.create_task(self._train_loop()))

    async def _catch_up(self, me: PeerInfo) -> None:
        """Load the run's current outer state from a peer that holds ours. A stage peer whose
        stage no live peer (and no full replica) holds any more rebuilds it from the
        neighbouring stages instead (CheckFree), or stage 0 from stage 1's copy of it."""
        sources = [p for p in self.membership.live_others() if covers(p, me)]
        lost_stage = me.role == "stage" and not any(p.role == "replica" for p in sources)
        try:
            if sources or not lost_stage:
                round_id, tensors, _ = await download_state(self.client, sources, self.state_shapes, attempts=2 if lost_stage else 3)
                await self._in_train(self._load_state, round_id, tensors)
                log.info("[%s] joined at round %d with the swarm's outer state", self.peer_id, round_id)
                return
        except ShoalError as exc:
            if not lost_stage:
                raise
            log.warning("[%s] no peer of stage %d delivered its state (%s)", self.peer_id, me.stage, exc)
            for source in sources:
                self.membership.declare_dead(source.peer_id)
        await rebuild_lost_stage(self, self.model_config)

    async def stop(self) -> None:
        self._stopping.set()
        tasks = [*self._tasks, *([self._probe] if self._probe is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()
        if self._runner is not None:
            await self._runner.cleanup()
        # off the loop: a stage-0 training thread may be waiting for a coroutine on it
        await asyncio.get_running_loop().run_in_executor(None, functools.partial(self._train_thread.shutdown, wait=True, cancel_futures=True))
        self._checkpoint_thread.shutdown(wait=True)  # let the last checkpoint land

    async def run_until_done(self) -> None:
        """Train until `max_rounds` (or forever), then keep serving until every live peer
        has reached our round (they may still need our set and hash), at most `linger_s`."""
        await self.finished.wait()
        if self.error is not None:
            raise RuntimeError(f"peer {self.peer_id} stopped on an error: {self.error!r}") from self.error
        deadline = time.monotonic() + self.config.linger_s
        while time.monotonic() < deadline:
            if all(p.round >= self.outer_round for p in self.membership.live_others()):
                await asyncio.sleep(2 * self.config.protocol.heartbeat_interval_s)  # their last requests
                return
            await asyncio.sleep(0.2)

    # ---- setup (training thread) ----------------------------------------------------

    def _build_data(self) -> None:
        config, run = self.config, self.config.run
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device = resolve_device(config.device)
        data = ByteData(load_corpus(config.data_path), num_shards=config.num_shards)
        self.batches = data.train_batches(self.peer_id, run.inner.batch_size, run.inner.seq_len, seed=run.seed)
        self.eval_set = data.eval_batches(run.inner.batch_size, run.inner.seq_len, config.eval_batches)

    def _build_trainer(self) -> None:
        """The model (or this stage's slice of it), its inner trainer and the outer optimizer."""
        config, run = self.config, self.config.run
        model = build_model(run.model_preset, seed=run.seed, device="meta")
        if model.config.to_dict() != run.model:
            raise ConfigMismatch(f"preset {run.model_preset!r} builds a different model than the run's")
        self.model_config = model.config
        slices = StagePlan(run.stages, model.config.n_layers).slices(parameter_names(model)) if run.stages else None
        if config.role == "stage":
            self.trainer = build_stage_trainer(self, model.config, self.membership.me.stage)
        else:
            model = build_model(run.model_preset, seed=run.seed)
            # --activation subspace:R on a full replica: train it as a compressed pipeline
            # replica would (weights confined), to compare against compressing every replica
            basis = parse_activation(config.activation, model.config, run.seed).basis
            self.trainer = InnerTrainer(model, run.inner, self.batches, self.device, confine_module(model, basis) if basis is not None else None)
        self.outer = build_outer(self.trainer.local_weights(), run.outer, slices)
        self.state_shapes = {n: tuple(t.shape) for n, t in self.outer.state_tensors().items()}
        if config.resume:
            loaded = load_latest(config.checkpoint_dir)
            if loaded is not None:
                tensors, manifest = loaded
                RunConfig.from_dict(manifest["run"]).check_same(run)
                self._load_state(manifest["round"], tensors)
                log.info("[%s] resumed from checkpoint round %d", self.peer_id, self.outer_round)

    def _load_state(self, round_id: int, tensors: dict[str, torch.Tensor]) -> None:
        self.outer.load_state_tensors(tensors)
        self.trainer.load_weights(self.outer.params)
        self.outer_round = round_id

    def restart_from(self, round_id: int, weights: Mapping[str, torch.Tensor], inner: InnerConfig, step: int) -> None:
        """Continue at `round_id` and inner step `step` from `weights` (all of our tensors,
        e.g. a stage rebuilt by CheckFree) with fresh optimizer state: the outer optimizer's
        as built (this runs right after `_build_trainer`) and a new inner one under `inner`."""
        state = dict(self.outer.state_tensors())
        state.update({f"outer/{name}": tensor for name, tensor in weights.items()})
        self._load_state(round_id, state)
        self.trainer.restart(inner, step)

    def _evaluate(self) -> float:
        begin = time.monotonic()
        loss = self.trainer.evaluate(self.eval_set)
        if self._last_inner_end is not None:  # during training: measurement, not sync overhead
            self.eval_seconds_total += time.monotonic() - begin
        return loss

    async def _in_train(self, fn, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._train_thread, fn, *args)

    # ---- membership ----------------------------------------------------------------

    async def _join(self, bootstrap: str) -> int:
        """Introduce ourselves to the run through `bootstrap`; returns the run's round."""
        request = {"peer": self.membership.me.to_wire(), "run": self.config.run.to_dict()}
        deadline = time.monotonic() + self.config.protocol.request_timeout_s
        while True:
            try:
                answer = (await self.client.call(bootstrap, "POST", "/join", request, joining=True)).payload
                break
            except PeerUnreachable as exc:
                if time.monotonic() > deadline:
                    raise ShoalError(f"cannot reach bootstrap {bootstrap}: {exc}") from None
                await asyncio.sleep(0.5)
        RunConfig.from_dict(answer.get("run", {})).check_same(self.config.run)
        self.wire.swarm_id = str(answer["swarm_id"])
        self.membership.merge(answer.get("peers"))
        return int(answer.get("round", 0))

    async def _gossip_loop(self) -> None:
        interval = self.config.protocol.heartbeat_interval_s
        while True:
            me = self.membership.me
            me.bytes_sent, me.bytes_received = self.traffic.bytes_sent, self.traffic.bytes_received
            self.membership.beat()
            targets = self.membership.gossip_targets(self.config.protocol.gossip_fanout, self._rng)
            probe = self.membership.probe_target(self._rng)
            if probe is not None and (self._probe is None or self._probe.done()):  # not awaited: a dead host may hang
                self._probe = asyncio.create_task(self.gossip_with(probe))
            await asyncio.gather(*(self.gossip_with(p) for p in targets))
            await asyncio.sleep(interval)

    async def gossip_with(self, peer: PeerInfo, timeout_s: float | None = None) -> bool:
        """Swap tables with `peer`; False if it did not answer within `timeout_s` (default
        two heartbeats and a second)."""
        try:
            answer = await self.client.call(peer.address, "POST", "/gossip", {"peers": self.membership.table()},
                                            timeout_s=timeout_s or 2 * self.config.protocol.heartbeat_interval_s + 1)
            self.membership.merge(answer.payload.get("peers"))
            return True
        except ShoalError as exc:
            log.debug("[%s] gossip with %s failed: %s", self.peer_id, peer.peer_id, exc)
            return False

    # ---- outer rounds ---------------------------------------------------------------

    def _on_step(self, step: int, loss: float) -> None:
        if self._stopping.is_set():
            raise Stopped()
        self._loop.call_soon_threadsafe(self._note_step, step, loss, self.trainer.last_grad_norm)

    def _note_step(self, step: int, loss: float, grad_norm: float | None) -> None:
        me = self.membership.me
        me.step, me.train_loss = step, loss if math.isfinite(loss) else None
        me.grad_norm = grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None

    async def _decode(self, tensors: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, self.outer.decode_contribution, tensors)

    async def _train_loop(self) -> None:
        run = self.config.run
        exchange = RoundExchange(self.client, self.membership, self.store, self.config.protocol, self._decode)
        if self.config.min_peers > 1 and self.outer_round == 0 and not self.config.standby:  # a run's start, not a late join
            log.info("[%s] waiting for %d peers before training", self.peer_id, self.config.min_peers)
            while len(self.membership.live_others()) + 1 < self.config.min_peers:
                await asyncio.sleep(0.2)
        round_id, pending, early = self.outer_round, None, None
        try:
            while True:
                if pending is not None:
                    # the last round's exchange completes while the first τ steps of this one run
                    # (τ = 0 but for Streaming DiLoCo); its outer step and merge follow them
                    more = self.config.max_rounds is None or round_id + 1 < self.config.max_rounds
                    steps = self.outer.overlap_steps if more else 0
                    early, _ = await asyncio.gather(self._in_train(self._inner, steps), pending)
                    pending, round_id = None, self.outer_round
                if self.config.max_rounds is not None and round_id >= self.config.max_rounds:
                    break
                steps = self.outer.round_steps(round_id, run.inner_steps) - (early.steps if early else 0)
                stats = await self._in_train(self._inner, max(0, steps))
                stats, early = (early + stats if early else stats), None
                self.membership.me.tokens_per_s = stats.tokens / max(stats.seconds, 1e-9)
                payload, own = await self._in_train(self._contribution, round_id)
                pending = asyncio.create_task(self._sync_round(exchange, round_id, stats, payload, own))
        except Stopped:
            return
        except Exception as exc:
            log.exception("[%s] training loop failed in round %d", self.peer_id, self.outer_round)
            self.error = exc
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
            self.finished.set()

    def _inner(self, steps: int):
        """Run inner steps (training thread), keeping the utilization bookkeeping: seconds
        spent in inner steps, and the longest stretch between two inner phases (waiting for
        the network, encoding, the outer step, evaluation)."""
        if steps == 0:
            return self.trainer.run(0)
        begin = time.monotonic()
        if self._last_inner_end is None:
            self.train_started_at = time.time()
        else:
            self.longest_stall_s = max(self.longest_stall_s, begin - self._last_inner_end)
        stats = self.trainer.run(steps, self._on_step)
        self._last_inner_end = time.monotonic()
        self.inner_seconds_total += stats.seconds
        return stats

    def _contribution(self, round_id: int) -> tuple[dict[str, bytes], Any]:
        self.outer.begin_round(round_id)
        payload = self.outer.contribution(self.trainer.local_weights())
        return payload, self.outer.decode_contribution(payload)  # use what others decode

    async def _sync_round(self, exchange: RoundExchange, round_id: int, stats, payload: dict[str, bytes], own: Any) -> None:
        """Publish our contribution, settle the round with the swarm (or with one partner),
        step the outer weights, verify and log."""
        protocol = self.config.protocol
        await exchange.publish(round_id, payload, own)
        if self.outer.pairwise:
            got = final = await self._exchange_with_partner(exchange, round_id)
        else:
            gather_s = protocol.gather_deadline_s(stats.seconds)
            got = await exchange.gather(round_id, gather_s)
            final = await exchange.agree(round_id, gather_s + protocol.agree_timeout_s)
        eval_loss, new_hash = await self._in_train(self._apply, round_id, exchange.contributions(round_id, final))
        if self.stage_service is not None:
            self.stage_service.round_applied()
        resynced = False
        if self.outer.pairwise:
            pass  # NoLoCo replicas do not agree on weights: nothing to verify
        elif self.outer.overlap_steps:
            # the others publish their hashes only after their own overlapped steps: check in
            # the background instead of holding our training for the slowest peer
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(asyncio.create_task(self._verify(exchange, round_id, new_hash, final)))
        else:
            resynced = await self._verify(exchange, round_id, new_hash, final)
            new_hash = self.outer.weights_hash() if resynced else new_hash
        self._after_round(round_id, stats, eval_loss, new_hash, got, final, resynced)
        if self.config.role == "stage" and self.membership.me.stage == 1:
            self._tasks = [t for t in self._tasks if not t.done()]
            self._tasks.append(asyncio.create_task(self._keep_stage0_copy(self.outer_round)))

    async def _keep_stage0_copy(self, round_id: int) -> None:
        """(stage 1) Fetch stage 0's outer weights of `round_id` and serve them with our state
        (CheckFree+: a peer that takes over a lost stage 0 copies them from us)."""
        fetched = await refresh_stage0_copy(self, self.model_config, round_id)
        if fetched is None:
            log.debug("[%s] no stage-0 peer delivered its weights of round %d; keeping the copy of an earlier round", self.peer_id, round_id)
            return
        if self._stage0_copy is None:
            log.info("[%s] keeping a copy of stage 0's weights (CheckFree+), refreshed every round", self.peer_id)
        self._stage0_copy = fetched
        if self.outer_round == round_id:  # else the next round's state carries it
            self._serve_state()

    async def _verify(self, exchange: RoundExchange, round_id: int, new_hash: str, final: list[str]) -> bool:
        """Compare weight hashes with the round's participants; a peer in the minority
        downloads the majority's outer state (loaded between two inner phases: the training
        thread runs one job at a time). True if it resynced."""
        same_slice = [p for p in final if p in self.membership.peers and same_slice_as(self.membership.peers[p], self.membership.me)]
        majority = await exchange.verify(round_id, new_hash, same_slice)
        if majority:
            synced_round, tensors, _ = await download_state(self.client, majority, self.state_shapes)
            await self._in_train(self._load_state, synced_round, tensors)
            log.warning("[%s] round %d: resynced the outer state from the majority (now round %d)", self.peer_id, round_id, synced_round)
        return bool(majority)

    async def _exchange_with_partner(self, exchange: RoundExchange, round_id: int) -> list[str]:
        """NoLoCo: fetch one random live replica's contribution for this step, waiting at most
        `partner_timeout_s`; returns the group (us, plus the partner if it answered). A
        failed partner costs this step its averaging, never more than the timeout."""
        candidates = [p for p in self.membership.live_others() if p.role == "replica" and p.first_round <= round_id]
        self._partner_wait_s = 0.0
        if not candidates:
            return [self.peer_id]
        partner = self._rng.choice(candidates)
        begin = time.monotonic()
        answered = await exchange.fetch(round_id, partner, self.config.protocol.partner_timeout_s)
        self._partner_wait_s = time.monotonic() - begin
        if not answered:
            log.info("[%s] step %d: partner %s did not answer; stepping alone", self.peer_id, round_id, partner.peer_id)
            return [self.peer_id]
        self.membership.me.partner = partner.peer_id
        return sorted([self.peer_id, partner.peer_id])

    def _apply(self, round_id: int, contributions: list) -> tuple[float | None, str]:
        self.outer.apply(contributions)
        self.trainer.load_weights(self.outer.merged_local(self.trainer.params))  # the live parameters: no copy unless merged
        self.outer_round = round_id + 1
        last = self.config.max_rounds is not None and self.outer_round >= self.config.max_rounds
        evaluate = self.outer_round % self.config.eval_every == 0 or last
        return (self._evaluate() if evaluate else None), self.outer.weights_hash()

    def _after_round(self, round_id: int, stats, eval_loss: float | None, new_hash: str, got: list[str], final: list[str], resynced: bool) -> None:
        me = self.membership.me
        # a peer table entry holds finite numbers only (others refuse the whole table otherwise)
        train_loss = stats.train_loss if math.isfinite(stats.train_loss) else None
        me.round, me.train_loss, me.weights_hash = self.outer_round, train_loss, new_hash
        if eval_loss is not None:  # not evaluated this round (--eval-every): keep the last
            me.eval_loss = eval_loss
        me.partner_distance = getattr(self.outer, "partner_distance", None)
        self.membership.beat()
        self._publish_state()
        entry = {"round": self.outer_round, "eval_loss": eval_loss, "train_loss": stats.train_loss, "weights_hash": new_hash,
                 "gathered": got, "applied": final, "resynced": resynced, "inner_seconds": stats.seconds, "time": time.time(),
                 "bytes_sent": self.traffic.bytes_sent, "contribution_bytes_sent": self.traffic.sent["contribution"],
                 "partner_distance": me.partner_distance, "partner_wait_s": self._partner_wait_s}
        if eval_loss is not None and getattr(self.trainer, "eval_stages", None):  # stage 0 with --eval-stages
            entry["eval_loss_partial"] = self.trainer.partial_eval_loss
        self.round_log.append(entry)
        log.info("[%s] round %d done: eval %s, train %.3f, %d/%d contributions, hash %s%s", self.peer_id, round_id,
                 "-" if eval_loss is None else f"{eval_loss:.3f}", stats.train_loss, len(final), len(got), new_hash[:8], " (resynced)" if resynced else "")

    def _publish_state(self) -> None:
        """Freeze the outer state for joiners and checkpoints."""
        snapshot = self._state_snapshot = {n: t.clone() for n, t in self.outer.state_tensors().items()}
        self.membership.me.weights_hash = weights_hash(self.outer.params)
        self._serve_state()
        if self.config.checkpoint_dir and self.outer_round > 0:
            info = {"run": self.config.run.to_dict(), "peer": self.peer_id, "swarm_id": self.wire.swarm_id}
            asyncio.get_running_loop().run_in_executor(self._checkpoint_thread, save_checkpoint, self.config.checkpoint_dir, self.outer_round, snapshot, info)

    def _serve_state(self) -> None:
        """Offer the last frozen outer state to joiners, with (stage 1) the copy of stage 0."""
        tensors = self._state_snapshot
        metadata: dict[str, Any] = {"peer": self.peer_id}
        if self._stage0_copy is not None:
            copy_round, copy = self._stage0_copy
            tensors = {**tensors, **copy}
            metadata[STAGE0_COPY + "round"] = copy_round
        self.state_server.update(self.outer_round, tensors, metadata)

    # ---- dashboard -------------------------------------------------------------------

    def swarm_snapshot(self) -> dict[str, Any]:
        peers = []
        for pid, info in sorted(self.membership.peers.items()):
            entry = info.to_wire()
            entry["alive"] = self.membership.status(pid) != "dead"
            entry["status"] = self.membership.status(pid)
            entry["last_seen"] = time.time() - (self.membership.clock() - self.membership.last_change.get(pid, 0.0))
            peers.append(entry)
        run = self.config.run
        return {
            "swarm_id": self.wire.swarm_id,
            "self_id": self.peer_id,
            "now": time.time(),
            "run": {"model": run.model_preset, "outer": run.outer.name, "codec": run.outer.codec, "inner_steps": run.inner_steps,
                    "params": sum(t.numel() for t in self.outer.params.values()) if hasattr(self, "outer") else None},  # none on a standby
            "round": self.outer_round,
            "pipeline": pipeline_view(run, self.router, self.paths),
            "peers": peers,
            "history": {pid: [{"round": r, **v} for r, v in sorted(rounds.items())] for pid, rounds in self.membership.history.items()},
            "traffic": {"sent": dict(self.traffic.sent), "received": dict(self.traffic.received)},
        }
