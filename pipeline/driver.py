"""Stage 0 drives a pipeline replica: it cuts each inner step's batch into microbatches and
runs them through the stage peers and back, several at a time.

One microbatch (S stages, "→" is one HTTP hop, chosen per hop by the router):

    embed(x) ─→ stage 1 ─→ … ─→ stage S−1 ─→ loss, dL/dh  (stage 0)
    commit ←── stage 1 ←── … ←── stage S−1 ←──┘            (same peers, reverse order)

That is the full pipeline's route; a `PathPlanner` (pipeline/paths.py) may give each
microbatch another one: a subset of the stages (SkipPipe), adjacent stages swapped
(SkipPipe, CheckFree+'s out-of-order microbatches), and a preferred peer per hop.

Up to `max_in_flight` microbatches run concurrently, so while stage 2 computes microbatch
j, stage 1 already works on j+1 (each stage serves its requests one at a time, in
order). When every microbatch of the step is back, stage 0 takes its own inner step and
tells every stage peer to take theirs (`/stage/step`); each averages the gradients of
the microbatches it saw (a replica that saw none only counts the step). With one peer per
stage that is exactly the whole batch's gradient (tests/pipeline checks it against the
unsplit model).

Failures: a forward hop that fails (peer unreachable, timeout, error) bans that peer in the
router and goes to another replica of the stage; a backward hop that fails sends the whole
microbatch round again through other peers (only the peer that ran a forward holds its
input). Stages downstream of the failure then count that microbatch twice in their
step's mean; rare, and bounded by `max_attempts`. A stage with no live peer left fails the
microbatch after the attempts (the step goes on with the others), and the step with
PipelineBroken if no microbatch got through: stage 0 then waits for the stage to be
served again (a joining stage peer takes the least served stage) and runs the step again.

The driver does no torch work on the event loop: embedding, loss and codec work run on
`compute` (an executor); hops go through `call`, which `peer/` implements with its client.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from shoal.compression.activation import ActivationCodec
from shoal.pipeline.paths import FullPaths, PathPlanner, Route
from shoal.pipeline.protocol import Microbatch
from shoal.pipeline.routing import NoRoute, Router
from shoal.pipeline.stages import StagePlan
from shoal.pipeline.worker import EdgeWorker

log = logging.getLogger(__name__)

Call = Callable[
    [str, str, dict[str, Any], float], Awaitable[dict[str, Any]]
]  # (peer id, path, payload, timeout_s) → answer


class HopFailed(Exception):
    """A hop to a stage peer failed (the `call` implementation raises it, or anything else)."""


class PipelineBroken(RuntimeError):
    """A microbatch could not get through the pipeline in `max_attempts` attempts."""


@dataclass(frozen=True)
class DriverConfig:
    microbatch_size: int = 4  # sequences per microbatch
    max_in_flight: int = 4  # microbatches in the pipeline at once
    hop_timeout_s: float = 30.0
    max_attempts: int = 4  # per microbatch
    retry_pause_s: float = 0.5  # before a microbatch's next attempt, doubling each time

    def __post_init__(self) -> None:
        if self.microbatch_size < 1 or self.max_in_flight < 1 or self.max_attempts < 1:
            raise ValueError("--microbatch-size, --in-flight and attempts must be >= 1")


@dataclass
class StepResult:
    loss: float  # mean over the step's microbatches
    tokens: int
    retries: int  # microbatch attempts that failed and ran again


class PipelineDriver:
    def __init__(
        self,
        edge: EdgeWorker,
        plan: StagePlan,
        codec: ActivationCodec,
        router: Router,
        call: Call,
        stage_peers: Callable[[int], Sequence[str]],
        compute: Executor,
        config: DriverConfig,
        name: str = "driver",
        paths: PathPlanner | None = None,
    ) -> None:
        self.edge, self.plan, self.codec, self.router = edge, plan, codec, router
        self.call, self.stage_peers, self.compute, self.config = call, stage_peers, compute, config
        self.name = name
        self.paths = paths or FullPaths(plan.num_stages)
        self.d_model = edge.module.config.d_model
        self._ids = itertools.count()
        self._round = 0
        self.round_step = 0  # inner steps taken in the current outer round
        self.retries_total = (
            0  # microbatch attempts that failed and ran again (training and evaluation)
        )
        self.failovers_total = 0  # forward hops moved to another replica of their stage

    @property
    def round(self) -> int:
        """The outer round the next microbatches belong to (set by the peer)."""
        return self._round

    @round.setter
    def round(self, value: int) -> None:
        if value != self._round:
            self._round, self.round_step = value, 0

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    # ---- one inner step ---------------------------------------------------------------

    async def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        """Run one inner step's batch through the pipeline, then step every stage."""
        retries_before = self.retries_total
        loss, done = await self.accumulate(x, y)
        await self._run(self.edge.step)
        self.round_step += 1
        await self._step_stages(step, loss)
        return StepResult(
            loss,
            done * self.config.microbatch_size * x.size(1),
            self.retries_total - retries_before,
        )

    async def accumulate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """Forward and backward every microbatch of (x, y), leaving the gradients
        accumulated on every stage; returns the mean loss and the microbatches that got
        through. A microbatch that fails `max_attempts` times is dropped from the step;
        PipelineBroken if all were."""
        size = self.config.microbatch_size
        pieces = [(x[s : s + size], y[s : s + size]) for s in range(0, x.size(0), size)]
        served = dict(enumerate(self._serving(), start=1))
        routes = await self._run(self.paths.plan, len(pieces), pieces[0][0].numel(), served)
        results = await self._in_flight(
            [
                self._microbatch(xs, ys, route)
                for (xs, ys), route in zip(pieces, routes, strict=True)
            ],
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, PipelineBroken):
                raise result
        losses = [r for r in results if not isinstance(r, BaseException)]
        if not losses:
            raise PipelineBroken(
                f"no microbatch got through the pipeline in {self.config.max_attempts} "
                "attempts; is every stage served?"
            )
        if len(losses) < len(results):
            log.warning(
                "[%s] dropped %d of %d microbatches of this step",
                self.name,
                len(results) - len(losses),
                len(results),
            )
        return sum(losses) / len(losses), len(losses)

    async def _in_flight(self, coroutines: list, return_exceptions: bool = False) -> list:
        """Run the microbatches' coroutines with at most `max_in_flight` at once."""
        gate = asyncio.Semaphore(self.config.max_in_flight)

        async def gated(coroutine):
            async with gate:
                return await coroutine

        return await asyncio.gather(
            *(gated(c) for c in coroutines), return_exceptions=return_exceptions
        )

    async def _attempts(
        self, x: torch.Tensor, what: str, once: Callable[[int, Microbatch], Awaitable[Any]]
    ) -> Any:
        """Run `once` for a microbatch of tokens `x`, each attempt under a fresh key (a
        stage may still hold the last attempt's input), pausing 0.5, 1, 2, … s between
        attempts (`_pause`); PipelineBroken after `max_attempts`."""
        for attempt in range(self.config.max_attempts):
            mb_id = next(self._ids)
            mb = Microbatch(f"{self.name}/{mb_id}", x)
            try:
                return await once(mb_id, mb)
            except (HopFailed, NoRoute) as exc:
                self.retries_total += 1
                log.warning(
                    "[%s] %s %s attempt %d failed: %s", self.name, what, mb.key, attempt + 1, exc
                )
                if attempt + 1 < self.config.max_attempts:
                    await self._pause(self.config.retry_pause_s * 2**attempt)
        raise PipelineBroken(
            f"{what} failed {self.config.max_attempts} times; is every stage served?"
        )

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds` before a retry, or less if the peers serving some stage change
        meanwhile (a replacement joined, e.g. a standby that rebuilt a lost stage)."""
        loop = asyncio.get_running_loop()
        before, deadline = self._serving(), loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            await asyncio.sleep(min(0.1, left))
            if self._serving() != before:
                return

    def _serving(self) -> list[list[str]]:
        return [list(self.stage_peers(stage)) for stage in range(1, self.plan.num_stages)]

    async def _microbatch(self, x: torch.Tensor, y: torch.Tensor, route: Route) -> float:
        async def once(mb_id: int, mb: Microbatch) -> float:
            h = await self._run(self.edge.embed, x)
            visited = []
            for stage, prefer in route:
                scale = self.paths.residual_scale(stage, route)
                peer, h = await self._forward(
                    stage, mb_id, mb, h, keep=True, prefer=prefer, scale=scale
                )
                visited.append((stage, peer))
            loss, grad, head_grads = await self._run(self.edge.head, h, y)
            for stage, peer in reversed(visited):
                grad = await self._backward(stage, peer, mb, grad)
            await self._run(self.edge.commit, x, grad, head_grads)
            return loss

        return await self._attempts(x, "microbatch", once)

    async def _forward(
        self,
        stage: int,
        mb_id: int,
        mb: Microbatch,
        h: torch.Tensor,
        keep: bool,
        prefer: str | None = None,
        scale: float = 1.0,
    ) -> tuple[str, torch.Tensor]:
        """One forward hop (to `prefer` if it is usable), trying other replicas of the
        stage when one fails; `scale`: the residual scale of a training forward."""
        payload = await self._run(
            self.codec.encode, h, mb.tokens
        )  # once: the same bytes go to any replica
        request = {
            **mb.to_wire(),
            "stage": stage,
            "round": self.round,
            "codec": self.codec.name,
            "act": payload,
        }
        if scale != 1.0:
            request["scale"] = scale
        tried: set[str] = set()
        while True:
            candidates = [p for p in self.stage_peers(stage) if p not in tried]
            peer = self.router.choose(
                stage, candidates, microbatch=mb_id, task_size=mb.tokens.numel(), prefer=prefer
            )
            tried.add(peer)
            begin = time.monotonic()
            try:
                answer = await self.call(
                    peer,
                    "/stage/forward" if keep else "/stage/infer",
                    request,
                    self.config.hop_timeout_s,
                )
                out = await self._run(self.codec.decode, answer.get("act"), mb.tokens, self.d_model)
            except Exception as exc:  # noqa: BLE001 - any failure of a hop means: try another replica
                self.router.failed(peer)
                self.failovers_total += 1
                log.info("[%s] forward to stage %d peer %s failed: %s", self.name, stage, peer, exc)
                if not [p for p in self.stage_peers(stage) if p not in tried]:
                    raise HopFailed(f"stage {stage}: no replica answered ({exc})") from None
                continue
            self.router.report(peer, seconds=time.monotonic() - begin, task_size=mb.tokens.numel())
            return peer, out

    async def _backward(
        self, stage: int, peer: str, mb: Microbatch, grad: torch.Tensor
    ) -> torch.Tensor:
        payload = await self._run(self.codec.encode_grad, grad, mb.tokens)
        request = {**mb.to_wire(), "stage": stage, "codec": self.codec.name, "grad": payload}
        begin = time.monotonic()
        try:
            answer = await self.call(peer, "/stage/backward", request, self.config.hop_timeout_s)
            out = await self._run(
                self.codec.decode_grad, answer.get("grad"), mb.tokens, self.d_model
            )
        except Exception as exc:  # noqa: BLE001 - the peer holding this microbatch's input is gone
            self.router.failed(peer)
            raise HopFailed(f"backward at stage {stage} peer {peer}: {exc}") from None
        self.router.report(
            peer, seconds=time.monotonic() - begin, task_size=mb.tokens.numel(), backward=True
        )
        return out

    async def _step_stages(self, step: int, loss: float) -> None:
        """Tell every live stage peer that this inner step is done: those that served
        microbatches of it step on their accumulated gradients, every one counts it toward
        the outer round (`round_step`: the round's steps done so far, so that a peer that
        missed some messages, e.g. one that joined mid-round, still knows where the round
        is). A peer that does not answer steps with the next step instead."""
        request = {
            "step": step,
            "round": self.round,
            "round_step": self.round_step,
            "train_loss": loss,
        }
        targets = [
            (stage, peer)
            for stage in range(1, self.plan.num_stages)
            for peer in self.stage_peers(stage)
        ]
        calls = [
            self.call(peer, "/stage/step", {**request, "stage": stage}, self.config.hop_timeout_s)
            for stage, peer in targets
        ]
        for (stage, peer), result in zip(
            targets, await asyncio.gather(*calls, return_exceptions=True), strict=True
        ):
            if isinstance(result, BaseException):
                log.warning(
                    "[%s] step %d: stage %d peer %s did not step: %s",
                    self.name,
                    step,
                    stage,
                    peer,
                    result,
                )

    # ---- evaluation -------------------------------------------------------------------

    async def evaluate(
        self,
        batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        stages: Sequence[int] | None = None,
    ) -> float:
        """Mean held-out loss through the pipeline (forward only, nothing kept), through
        every stage or only `stages` (in that order): inference on part of the model."""
        size = self.config.microbatch_size
        stages = list(range(1, self.plan.num_stages)) if stages is None else list(stages)
        if (
            not stages
            or not all(1 <= s < self.plan.num_stages for s in stages)
            or len(set(stages)) < len(stages)
        ):
            raise ValueError(
                "evaluation stages must be distinct block stages in "
                f"1..{self.plan.num_stages - 1}, got {stages}"
            )

        async def one(x: torch.Tensor, y: torch.Tensor) -> float:
            async def once(mb_id: int, mb: Microbatch) -> float:
                h = await self._run(self.edge.embed, x)
                for stage in stages:
                    _, h = await self._forward(stage, mb_id, mb, h, keep=False)
                return await self._run(self.edge.evaluate_loss, h, y)

            return await self._attempts(x, "evaluation microbatch", once)

        pieces = [
            (x[s : s + size], y[s : s + size])
            for x, y in batches
            for s in range(0, x.size(0), size)
        ]
        losses = await self._in_flight([one(x, y) for x, y in pieces])
        weights = [x.numel() for x, _ in pieces]
        return sum(loss * w for loss, w in zip(losses, weights, strict=True)) / sum(weights)
