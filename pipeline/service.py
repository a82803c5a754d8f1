"""The stage side of the pipeline protocol (pipeline/protocol.py): what a stage peer does
with `/stage/forward`, `/stage/infer`, `/stage/backward` and `/stage/step`. Plain async methods over
payload dicts, so they are testable without a socket; `peer/server.py` routes to them.

Torch and codec work runs on `compute` (one thread: requests are served in arrival order,
which is what lets several microbatches flow through the pipeline at once). Inner steps
are counted per outer round for the peer's round loop (`wait_steps`), which runs on
another thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from shoal.pipeline.compression import ActivationSetting
from shoal.pipeline.protocol import (
    Microbatch,
    StageRequestError,
    check_bytes,
    check_int,
    check_loss,
    check_scale,
)
from shoal.pipeline.worker import BlockWorker
from shoal.train.model import ModelConfig


class StageService:
    def __init__(
        self,
        worker: BlockWorker,
        stage: int,
        setting: ActivationSetting,
        model: ModelConfig,
        compute: Executor,
        current_round: Callable[[], int],
        round_wait_s: float = 120.0,
        emulate_forward_s: float = 0.0,
    ) -> None:
        self.worker, self.stage, self.setting, self.model = worker, stage, setting, model
        self.compute, self.current_round, self.round_wait_s = compute, current_round, round_wait_s
        # benchmarks only: a training forward takes at least this long and a backward twice
        # that (the compute thread sleeps out the rest), emulating a slower device
        self.emulate_forward_s = emulate_forward_s
        self.tokens = 0  # tokens of the microbatches served (forward, training only)
        self.busy_s = 0.0  # compute seconds spent on forwards and backwards
        self.last_loss: float | None = None
        self._steps: Counter[int] = (
            Counter()
        )  # inner steps done per outer round, as the drivers report
        self._steps_changed = threading.Condition()
        self._driver_round = 0  # the latest outer round a driver's microbatch was in
        self._round_changed = asyncio.Event()

    # ---- requests ---------------------------------------------------------------------

    async def forward(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A training forward: the input is kept for the backward."""
        return await self._forward(payload, keep=True)

    async def infer(self, payload: dict[str, Any]) -> dict[str, Any]:
        """An evaluation forward: nothing is kept."""
        return await self._forward(payload, keep=False)

    async def _forward(self, payload: dict[str, Any], keep: bool) -> dict[str, Any]:
        mb = self._microbatch(payload)
        round_id = check_int(payload, "round")
        await self._await_round(round_id)
        act = check_bytes(payload, "act")
        scale = check_scale(payload)
        if scale != 1.0 and not keep:
            raise StageRequestError("/stage/infer takes no residual scale")

        def work() -> bytes:
            begin = time.monotonic()
            h = self.setting.codec.decode(act, mb.tokens, self.model.d_model)
            out = self.worker.forward(mb.key, h, keep=keep, scale=scale)
            encoded = self.setting.codec.encode(out, mb.tokens)
            if keep:
                self._emulate(begin, self.emulate_forward_s)
            self.busy_s += time.monotonic() - begin
            return encoded

        result = await self._run(work)
        if keep:
            self.tokens += mb.tokens.numel()
        return {"act": result}

    async def backward(self, payload: dict[str, Any]) -> dict[str, Any]:
        mb = self._microbatch(payload)
        grad = check_bytes(payload, "grad")

        def work() -> bytes:
            begin = time.monotonic()
            g = self.setting.codec.decode_grad(grad, mb.tokens, self.model.d_model)
            encoded = self.setting.codec.encode_grad(self.worker.backward(mb.key, g), mb.tokens)
            self._emulate(begin, 2 * self.emulate_forward_s)
            self.busy_s += time.monotonic() - begin
            return encoded

        return {"grad": await self._run(work)}

    async def step(self, payload: dict[str, Any]) -> dict[str, Any]:
        self._check_stage(payload)
        check_int(payload, "step")
        round_id = check_int(payload, "round")
        round_step = check_int(payload, "round_step", low=1)
        loss = check_loss(payload)
        stepped = await self._run(self.worker.step)
        with self._steps_changed:
            self._steps[round_id] = max(self._steps[round_id] + 1, round_step)
            self.last_loss = loss if loss is not None else self.last_loss
            self._steps_changed.notify_all()
        return {"stepped": stepped, "step": self.worker.step_count}

    # ---- the round loop's view --------------------------------------------------------

    def wait_steps(self, round_id: int, steps: int, stopping: threading.Event) -> int:
        """Block (training thread) until the driver has finished `steps` inner steps of
        outer round `round_id`, or has sent a microbatch of a later round (we joined in the
        middle of round `round_id` and saw only its last steps), or `stopping` is set;
        returns the steps seen."""
        with self._steps_changed:
            while (
                self._steps[round_id] < steps
                and self._driver_round <= round_id
                and not stopping.is_set()
            ):
                self._steps_changed.wait(0.2)
            for old in [r for r in self._steps if r < round_id]:
                del self._steps[old]
            return self._steps[round_id]

    def round_applied(self) -> None:
        """The peer applied an outer round: release forwards that waited for it."""
        self._round_changed.set()
        self._round_changed = asyncio.Event()

    # ---- helpers ----------------------------------------------------------------------

    def _microbatch(self, payload: dict[str, Any]) -> Microbatch:
        self._check_stage(payload)
        if payload.get("codec") != self.setting.name:
            raise StageRequestError(
                f"this stage peer serves activation codec {self.setting.spec!r}, "
                f"got {payload.get('codec')!r}"
            )
        return Microbatch.from_wire(payload, self.model.vocab_size, self.model.max_seq_len)

    def _check_stage(self, payload: dict[str, Any]) -> None:
        if payload.get("stage") != self.stage:
            raise StageRequestError(
                f"this peer serves stage {self.stage}, not {payload.get('stage')!r}"
            )

    async def _await_round(self, round_id: int) -> None:
        deadline = time.monotonic() + self.round_wait_s
        if self.current_round() < round_id:
            with self._steps_changed:  # the driver has moved on: our round's steps are all in
                self._driver_round = max(self._driver_round, round_id)
                self._steps_changed.notify_all()
        while self.current_round() < round_id:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StageRequestError(
                    f"stage is at outer round {self.current_round()}, the microbatch at {round_id}"
                )
            try:
                await asyncio.wait_for(self._round_changed.wait(), remaining)
            except TimeoutError:
                pass

    @staticmethod
    def _emulate(begin: float, seconds: float) -> None:
        if seconds > 0:
            time.sleep(max(0.0, begin + seconds - time.monotonic()))

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn)
