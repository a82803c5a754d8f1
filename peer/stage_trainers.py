"""What "inner steps" mean for a pipeline stage peer (`--role stage`).

The round engine runs the same loop for every role: {inner steps → contribution → outer
round → apply}. These two trainers give stage peers the interface of
`optim.inner.InnerTrainer` (`run`, `local_weights`, `load_weights`, `params`, `evaluate`):

- `DriverTrainer` (stage 0): each inner step cuts a batch of its data into microbatches and
  drives them through the stage peers (`pipeline.driver`). It blocks the training thread
  while the event loop carries the hops; torch work runs on the driver's compute thread.
  While some stage has no peer it waits, at most `stall_timeout_s` since the pipeline last
  stepped, then fails with a message naming the missing stages.
- `ServingTrainer` (stages 1..S−1): the stage serves hops as they come; an inner step is a
  `/stage/step` from the driver, so `run(H)` waits for H of them in the current round.

Stage peers of one slice average with each other and with the full replicas' same tensors
in the outer rounds; the pipeline's microbatches never cross a round boundary (a stage
answers a round-r forward only after applying round r−1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from shoal.optim.inner import InnerConfig, InnerStats
from shoal.peer.errors import ShoalError, Stopped
from shoal.peer.trainthread import TrainingThread
from shoal.pipeline.driver import PipelineBroken, PipelineDriver
from shoal.pipeline.service import StageService
from shoal.pipeline.worker import BlockWorker, EdgeWorker, SliceTrainer

log = logging.getLogger(__name__)
Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
StepCallback = Callable[[int, float], None]


class SliceView:
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


class DriverTrainer(SliceView):
    def __init__(
        self,
        edge: EdgeWorker,
        driver: PipelineDriver,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        thread: TrainingThread,
        current_round: Callable[[], int],
        missing_stages: Callable[[], list[int]],
        stall_timeout_s: float,
        eval_stages: Sequence[int] | None = None,
    ) -> None:
        super().__init__(edge)
        self.edge, self.driver, self.batches, self.thread = edge, driver, batches, thread
        self.current_round, self.missing_stages = current_round, missing_stages
        self.stall_timeout_s = stall_timeout_s
        self.eval_stages = eval_stages
        self.partial_eval_loss: float | None = None  # last held-out loss through eval_stages only
        self._last_progress = time.monotonic()

    def _missing(self) -> list[int]:
        async def ask() -> list[int]:
            return self.missing_stages()

        return self.thread.on_loop(ask())

    def _check_stall(self, why: str) -> None:
        stalled_s = time.monotonic() - self._last_progress
        if stalled_s > self.stall_timeout_s:
            raise ShoalError(
                f"the pipeline has not stepped for {stalled_s:.0f} s ({why}); giving up after "
                f"--pipeline-stall-timeout {self.stall_timeout_s:.0f} s"
            )

    def _wait_for_stages(self) -> None:
        while missing := self._missing():
            self.thread.check()
            self._check_stall(f"no live peer serves stage(s) {missing}")
            time.sleep(0.2)

    def run(self, steps: int, on_step: StepCallback | None = None) -> InnerStats:
        begin, losses, tokens = time.perf_counter(), [], 0
        self.driver.round = self.current_round()
        self._last_progress = time.monotonic()
        for _ in range(steps):
            x, y = next(self.batches)
            while True:
                self._wait_for_stages()
                try:
                    step = self.edge.step_count
                    result = self.thread.on_loop(self.driver.train_step(x, y, step))
                    break
                except PipelineBroken as exc:
                    log.warning(
                        "[%s] step %d: %s; waiting for every stage to be served",
                        self.driver.name,
                        self.edge.step_count,
                        exc,
                    )
                    self._check_stall(str(exc))
                    time.sleep(0.2)
            self._last_progress = time.monotonic()
            losses.append(result.loss)
            tokens += result.tokens
            if on_step is not None:
                on_step(self.edge.step_count, result.loss)
        mean = sum(losses) / len(losses) if losses else float("nan")
        seconds = time.perf_counter() - begin
        return InnerStats(steps=steps, tokens=tokens, seconds=seconds, train_loss=mean)

    def evaluate(self, batches: Batches) -> float | None:
        """Held-out loss through the pipeline; None while some stage has no peer. With
        `eval_stages`, also the loss through those stages alone (`partial_eval_loss`)."""
        if self._missing():
            return None
        self.driver.round = self.current_round()
        if self.eval_stages:
            partial = self.driver.evaluate(batches, self.eval_stages)
            self.partial_eval_loss = self.thread.on_loop(partial)
        return self.thread.on_loop(self.driver.evaluate(batches))


class ServingTrainer(SliceView):
    def __init__(
        self,
        worker: BlockWorker,
        service: StageService,
        current_round: Callable[[], int],
        thread: TrainingThread,
    ) -> None:
        super().__init__(worker)
        self.worker, self.service, self.current_round, self.thread = (
            worker,
            service,
            current_round,
            thread,
        )

    def run(self, steps: int, on_step: StepCallback | None = None) -> InnerStats:
        begin, tokens_before = time.perf_counter(), self.service.tokens
        round_id, seen = self.current_round(), 0
        while seen < steps:
            now_seen = self.service.wait_steps(round_id, seen + 1, self.thread.stopping)
            if self.thread.stopping.is_set():
                raise Stopped()
            if now_seen == seen:  # the driver is in a later round: we joined late in this one
                break
            seen = now_seen
            if on_step is not None:
                on_step(self.worker.step_count, self._driver_loss())
        tokens = self.service.tokens - tokens_before
        seconds = time.perf_counter() - begin
        return InnerStats(
            steps=seen, tokens=tokens, seconds=seconds, train_loss=self._driver_loss()
        )

    def _driver_loss(self) -> float:
        """The training loss stage 0 reported with its last step message."""
        return self.service.last_loss if self.service.last_loss is not None else float("nan")

    def evaluate(self, batches: Batches) -> None:
        return None  # a block stage cannot evaluate alone: stage 0 reports the replica's loss
