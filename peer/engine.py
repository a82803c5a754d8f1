"""The round engine: one peer's outer rounds, the same for every role.

    inner steps (training thread) → contribution (training thread) → prepare its answer
    body (executor) → publish → gather → agree → outer step + snapshot (training thread)
    → verify hashes → publish the snapshot → next round

The exchange itself is `peer.rounds` (publish / gather / agree / verify, with NoLoCo's
`fetch` of one partner instead of gather + agree). What the inner steps are is the role's
trainer (`peer.roles`). With Streaming DiLoCo a round's exchange runs while the next
round's first τ inner steps train, and the hash check runs in the background (a failed
resync stops the peer: it can no longer be trusted). Every state change (outer step,
resync, join, CheckFree rebuild) is followed by a snapshot taken on the training thread,
with the weights hash computed there once, which the publisher serves and checkpoints.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from shoal.optim.inner import InnerConfig, InnerStats
from shoal.optim.registry import build_outer
from shoal.peer.checkpoint import load_latest
from shoal.peer.config import RunConfig
from shoal.peer.errors import ShoalError, Stopped
from shoal.peer.holders import covers, expected_replicas, holding_ours
from shoal.peer.publisher import Snapshot, take_snapshot
from shoal.peer.reduce import PSEUDO_GRADIENT_KINDS, ShardedMean
from shoal.peer.roles import PeerContext, Role
from shoal.peer.rounds import RoundExchange, resync_terms
from shoal.peer.roundstore import RoundStore
from shoal.peer.runfiles import load_init_weights
from shoal.peer.statesync import download_state
from shoal.peer.wire import WireCodec
from shoal.pipeline.stages import StagePlan
from shoal.train import build_model, parameter_names

log = logging.getLogger(__name__)


class RoundEngine:
    def __init__(self, ctx: PeerContext, role: Role, store: RoundStore, wire: WireCodec) -> None:
        self.ctx, self.role, self.wire = ctx, role, wire
        self.config = ctx.config
        protocol = ctx.config.protocol
        self.exchange = RoundExchange(
            ctx.client, ctx.agent.membership, store, protocol, self._decode
        )
        self.sharded = ShardedMean(
            self.exchange,
            lambda piece: self.outer.codec.encode(piece),
            lambda data, count: self.outer.codec.decode(data, (count,)),
        )
        self.trainer: Any = None  # built by `build` (training thread)
        self.outer: Any = None
        self.state_shapes: dict[str, tuple[int, ...]] = {}
        self.round_log: list[dict[str, Any]] = []  # one entry per applied round (tests, demo)
        self.initial_eval_loss: float | None = None
        self.train_started_at: float | None = None  # wall clock of the first inner step
        self.inner_seconds_total = 0.0
        self.longest_stall_s = 0.0
        self.eval_seconds_total = 0.0
        self._last_inner_end: float | None = None
        self._partner_wait_s: float | None = None  # NoLoCo: the last step's wait for its partner
        self._rng = random.Random(secrets.randbits(64))

    @property
    def peer_id(self) -> str:
        return self.ctx.peer_id

    @property
    def round(self) -> int:
        return self.ctx.progress.round

    # ---- the training thread's jobs ---------------------------------------------------

    def build(self) -> None:
        """The model (or this stage's slice of it), its inner trainer and the outer
        optimizer; with `--resume`, the latest checkpoint loaded."""
        run = self.config.run
        model = build_model(run.model_config(), seed=run.seed, device="meta")
        self.model_config = model.config
        slices = None
        if run.stages:
            slices = StagePlan(run.stages, model.config.n_layers).slices(parameter_names(model))
        self.trainer = self.role.build_trainer(model.config)
        self.outer = build_outer(self.trainer.local_weights(), run.outer, slices)
        self.state_shapes = {n: tuple(t.shape) for n, t in self.outer.state_tensors().items()}
        if run.init is not None and self.config.files.init_from is not None:
            init = load_init_weights(self.config.files.init_from, run)
            state = {f"outer/{name}": init[name] for name in self.outer.params}
            self._load_state(0, {**self.outer.state_tensors(), **state})
        schedule = self.config.schedule
        if schedule.resume:
            loaded = load_latest(schedule.checkpoint_dir)
            if loaded is not None:
                tensors, manifest = loaded
                RunConfig.from_dict(manifest["run"]).check_same(run)
                self._load_state(manifest["round"], tensors)
                log.info("[%s] resumed from checkpoint round %d", self.peer_id, self.round)

    def _load_state(self, round_id: int, tensors: Mapping[str, torch.Tensor]) -> None:
        self.outer.load_state_tensors(tensors)
        self.trainer.load_weights(self.outer.params)
        self.ctx.progress.round = round_id

    def load_state(self, round_id: int, tensors: Mapping[str, torch.Tensor]) -> Snapshot:
        self._load_state(round_id, tensors)
        return take_snapshot(self.outer, round_id)

    def restart_from(
        self, round_id: int, weights: Mapping[str, torch.Tensor], inner: InnerConfig, step: int
    ) -> Snapshot:
        """Continue at `round_id` and inner step `step` from `weights` (all of our tensors,
        e.g. a stage rebuilt by CheckFree) with fresh optimizer state: the outer optimizer's
        as built (this runs right after `build`) and a new inner one under `inner`."""
        state = dict(self.outer.state_tensors())
        state.update({f"outer/{name}": tensor for name, tensor in weights.items()})
        self._load_state(round_id, state)
        self.trainer.restart(inner, step)
        return take_snapshot(self.outer, round_id)

    def snapshot(self) -> Snapshot:
        return take_snapshot(self.outer, self.round)

    def evaluate(self) -> float | None:
        begin = time.monotonic()
        loss = self.trainer.evaluate(self.ctx.eval_set)
        if self._last_inner_end is not None:  # during training: measurement, not sync overhead
            self.eval_seconds_total += time.monotonic() - begin
        return loss

    def initial_weights(self) -> dict[str, torch.Tensor]:
        """Our tensors' weights as built (the run's initial weights, before any load)."""
        return dict(self.outer.params)

    def _inner(self, steps: int) -> InnerStats:
        """Run inner steps, keeping the utilization bookkeeping: seconds spent in inner
        steps, and the longest stretch between two inner phases (waiting for the network,
        encoding, the outer step, evaluation)."""
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

    def _on_step(self, step: int, loss: float) -> None:
        self.ctx.thread.check()
        self.ctx.thread.call_soon(self._note_step, step, loss, self.trainer.last_grad_norm)

    def _contribution(self, round_id: int) -> tuple[dict[str, bytes] | None, Any]:
        """The encoded contribution and its decoded self (what others decode); with
        reduce-scatter, None and the flat pseudo-gradient (encoded shard by shard)."""
        self.outer.begin_round(round_id)
        local = self.trainer.local_weights()
        if self.outer.reducible:
            return None, self.outer.flat_delta(local)
        payload = self.outer.contribution(local)
        return payload, self.outer.decode_contribution(payload)

    def _apply(self, round_id: int, step: Callable[[], None]) -> tuple[float | None, Snapshot]:
        step()  # the outer step: apply the round's contributions, or their mean
        # the live parameters: no copy unless merged
        self.trainer.load_weights(self.outer.merged_local(self.trainer.params))
        self.ctx.progress.round = round_id + 1
        max_rounds = self.config.schedule.max_rounds
        last = max_rounds is not None and self.round >= max_rounds
        evaluate = self.round % self.config.data.eval_every == 0 or last
        eval_loss = self.evaluate() if evaluate else None
        return eval_loss, take_snapshot(self.outer, self.round)

    # ---- the event loop's side --------------------------------------------------------

    def _note_step(self, step: int, loss: float, grad_norm: float | None) -> None:
        me = self.ctx.agent.me
        me.step, me.train_loss = step, loss if math.isfinite(loss) else None
        finite = grad_norm is not None and math.isfinite(grad_norm)
        me.grad_norm = grad_norm if finite else None

    async def _decode(self, tensors: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.outer.decode_contribution, tensors)

    def publish_snapshot(self, snapshot: Snapshot) -> None:
        self.ctx.agent.me.weights_hash = snapshot.weights_hash
        self.ctx.publisher.publish(snapshot)

    async def download(self, sources: list, attempts: int, **wanted: Any) -> None:
        """Load the outer state from `sources` (its chunks spread over those in step);
        `wanted`: `download_state`'s check and min_round (and its wait)."""
        round_id, tensors, _ = await download_state(
            self.ctx.client, sources, self.state_shapes, attempts=attempts, **wanted
        )
        self.publish_snapshot(await self.ctx.thread.run(self.load_state, round_id, tensors))
        log.info("[%s] loaded the swarm's outer state of round %d", self.peer_id, round_id)

    async def catch_up(self) -> None:
        """Load the run's current outer state from a peer that holds ours. A stage peer whose
        stage no live peer (and no full replica) holds any more rebuilds it (CheckFree)."""
        me = self.ctx.agent.me
        sources = [p for p in self.ctx.agent.membership.live_others() if covers(p, me)]
        lost_stage = me.role == "stage" and not any(p.role == "replica" for p in sources)
        attempts = self.config.protocol.state_download_attempts
        try:
            if sources or not lost_stage:
                await self.download(sources, attempts=2 if lost_stage else attempts)
                return
        except ShoalError as exc:
            if not lost_stage:
                raise
            log.warning(
                "[%s] no peer of stage %d delivered its state (%s)", self.peer_id, me.stage, exc
            )
            for source in sources:
                self.ctx.agent.membership.declare_dead(source.peer_id)
        assert me.stage is not None
        await self.ctx.recovery.rebuild(me.stage, self._restart, self.initial_weights())

    async def _restart(
        self, round_id: int, weights: Mapping[str, torch.Tensor], inner: InnerConfig, step: int
    ) -> None:
        snapshot = await self.ctx.thread.run(self.restart_from, round_id, weights, inner, step)
        self.publish_snapshot(snapshot)

    async def run(self) -> None:
        """Train round after round until `--rounds` (or forever); returns when stopped."""
        try:
            await self._rounds()
        except Stopped:
            return

    async def _rounds(self) -> None:
        run, schedule = self.config.run, self.config.schedule
        if schedule.min_peers > 1 and self.round == 0 and not self.config.pipeline.standby:
            # a run's start, not a late join
            await self.ctx.agent.wait_for_peers(
                schedule.min_peers, self.config.protocol.min_peers_timeout_s
            )
        round_id, pending, early = self.round, None, None
        try:
            while True:
                if pending is not None:
                    # the last round's exchange completes while the first τ steps of this one
                    # run (τ = 0 but for Streaming DiLoCo); its outer step and merge follow
                    more = schedule.max_rounds is None or round_id + 1 < schedule.max_rounds
                    steps = self.outer.overlap_steps if more else 0
                    early, _ = await asyncio.gather(
                        self.ctx.thread.run(self._inner, steps), pending
                    )
                    pending, round_id = None, self.round
                if schedule.max_rounds is not None and round_id >= schedule.max_rounds:
                    break
                steps = self.outer.round_steps(round_id, run.inner_steps) - (
                    early.steps if early else 0
                )
                stats = await self.ctx.thread.run(self._inner, max(0, steps))
                stats, early = (early + stats if early else stats), None
                self.ctx.agent.me.tokens_per_s = stats.tokens / max(stats.seconds, 1e-9)
                payload, own = await self.ctx.thread.run(self._contribution, round_id)
                pending = asyncio.create_task(self._sync_round(round_id, stats, payload, own))
        finally:
            if pending is not None and not pending.done():
                pending.cancel()

    async def _sync_round(
        self, round_id: int, stats: InnerStats, payload: dict[str, bytes] | None, own: Any
    ) -> None:
        """Publish our contribution, settle the round with the swarm (or with one partner),
        step the outer weights, verify and log."""
        protocol, exchange = self.config.protocol, self.exchange
        gather_s = protocol.gather_deadline_s(stats.seconds)
        if payload is None:  # reduce-scatter: `own` is our flat pseudo-gradient
            self.sharded.publish(round_id, own)
            view = expected_replicas(self.ctx.agent.membership, round_id)
            final = await exchange.agree(round_id, gather_s + protocol.agree_timeout_s, view)
            got = sorted({*view, self.peer_id})
            mean, final = await self.sharded.mean(
                round_id, final, gather_s, self.config.run.outer.shard_elements
            )
            step = functools.partial(self.outer.apply_mean, mean)
        else:
            answer = {"round": round_id, "peer": self.peer_id, "tensors": payload}
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(None, self.wire.prepare, answer)  # once
            await exchange.publish(round_id, prepared, own)
            if self.outer.pairwise:
                got = final = await self._exchange_with_partner(round_id)
            else:
                got = await exchange.gather(round_id, gather_s)
                final = await exchange.agree(round_id, gather_s + protocol.agree_timeout_s)
            contributions = exchange.contributions(round_id, final)
            step = functools.partial(self.outer.apply, contributions)
        eval_loss, snapshot = await self.ctx.thread.run(self._apply, round_id, step)
        self.role.on_applied()
        resynced = False
        if self.outer.pairwise:
            pass  # NoLoCo replicas do not agree on weights: nothing to verify
        elif self.outer.overlap_steps:
            # the others publish their hashes only after their own overlapped steps: check in
            # the background instead of holding our training for the slowest peer
            verify = self._verify(round_id, snapshot.weights_hash, final)
            self.ctx.tasks.spawn(verify, name=f"hash check of round {round_id}", fatal=True)
        else:
            resynced = await self._verify(round_id, snapshot.weights_hash, final)
        if not resynced:  # a resync published the state it loaded
            self.publish_snapshot(snapshot)
        self._log_round(round_id, stats, eval_loss, got, final, resynced)
        self.ctx.tasks.spawn(self.role.after_round(self.round), name=f"after round {round_id}")

    async def _verify(self, round_id: int, new_hash: str, final: list[str]) -> bool:
        """Compare weight hashes with the round's participants; a peer in the minority
        downloads the majority's outer state (loaded between two inner phases: the training
        thread runs one job at a time). True if it resynced."""
        same_slice = holding_ours(self.ctx.agent.membership, final)
        majority, top_hash = await self.exchange.verify(round_id, new_hash, same_slice)
        if majority:
            terms = resync_terms(self.exchange, round_id, top_hash, same_slice)
            await self.download(majority, self.config.protocol.state_download_attempts, **terms)
            log.warning(
                "[%s] round %d: resynced the outer state from the majority (now round %d)",
                self.peer_id,
                round_id,
                self.round,
            )
        return bool(majority)

    async def _exchange_with_partner(self, round_id: int) -> list[str]:
        """NoLoCo: average with one random live replica (`RoundExchange.partner`)."""
        begin = time.monotonic()
        timeout_s = self.config.protocol.partner_timeout_s
        group, partner = await self.exchange.partner(round_id, self._rng, timeout_s)
        self._partner_wait_s = time.monotonic() - begin
        if partner is not None:
            self.ctx.agent.me.partner = partner
        return group

    def _log_round(
        self,
        round_id: int,
        stats: InnerStats,
        eval_loss: float | None,
        got: list[str],
        final: list[str],
        resynced: bool,
    ) -> None:
        me, traffic = self.ctx.agent.me, self.ctx.client.traffic
        # a peer table entry holds finite numbers only (others refuse the whole table otherwise)
        me.round = self.round
        me.train_loss = stats.train_loss if math.isfinite(stats.train_loss) else None
        if eval_loss is not None:  # not evaluated this round (--eval-every): keep the last
            me.eval_loss = eval_loss
        me.partner_distance = getattr(self.outer, "partner_distance", None)
        self.ctx.agent.beat()
        entry = {
            "round": self.round,
            "eval_loss": eval_loss,
            "train_loss": stats.train_loss,
            "weights_hash": me.weights_hash,
            "gathered": got,
            "applied": final,
            "resynced": resynced,
            "inner_seconds": stats.seconds,
            "time": time.time(),
            "bytes_sent": traffic.bytes_sent,
            "contribution_bytes_sent": sum(traffic.sent[k] for k in PSEUDO_GRADIENT_KINDS),
            "partner_distance": me.partner_distance,
            "partner_wait_s": self._partner_wait_s,
        }
        if eval_loss is not None and getattr(self.trainer, "eval_stages", None):
            entry["eval_loss_partial"] = self.trainer.partial_eval_loss  # stage 0, --eval-stages
        self.round_log.append(entry)
        log.info(
            "[%s] round %d done: eval %s, train %.3f, %d/%d contributions, hash %s%s",
            self.peer_id,
            round_id,
            "-" if eval_loss is None else f"{eval_loss:.3f}",
            stats.train_loss,
            len(final),
            len(got),
            (me.weights_hash or "")[:8],
            " (resynced)" if resynced else "",
        )
