"""Which stages each microbatch of an inner step visits, in what order, and on which peer.

Stage 0's driver asks its `PathPlanner` for one route per microbatch at the start of every
inner step. A route lists the block stages (1..S−1) the microbatch runs forward, in order,
each with the peer the plan prefers (None: the router picks); the backward pass walks the
same peers in reverse, and stage 0 embeds before the first and takes the loss after the
last. Three planners:

* `FullPaths`: every stage in order (the plain pipeline); the router picks each peer.
* `FullPaths(swap_fraction=f)`: CheckFree+'s out-of-order execution: a fraction f of the
  microbatches run the first two block stages swapped (2, 1, …) and the last two swapped
  (…, S−1, S−2), so each edge block stage also learns to do its neighbour's job and a lost
  edge stage can be rebuilt by copying that neighbour (pipeline/checkfree.py).
* `SkipPaths`: SkipPipe (pipeline/skippipe.py): each microbatch visits only some stages
  (default 4 of 6, stage 0 counted, the first block stage always among them: SkipPipe's
  stage 0 holds the first layers, ours none), possibly with adjacent stages swapped, on the
  peers the time-aware scheduler picks from the live stage peers and the speeds the router
  measured (seconds per token of a forward hop, transfer included). The plan is recomputed every
  step, so peers that join, leave or slow down are planned around at the next step; a
  planned peer that is banned or gone at hop time is replaced by the router's choice.

Each stage's inner step averages the gradients of the microbatches that visited it
(pipeline/worker.py), so a stage skipped by some microbatches still takes a full step.
With `rescale` (`--skip-rescale`, default `sqrt`) a skipping path's stages that are not
kept run their training forwards with a residual scale p^−1/2 (or 1/p), p the share of
paths that visit them (pipeline/worker.py, `residual_scale`).
"""

from __future__ import annotations

import dataclasses
import statistics
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

from shoal.pipeline.routing import Router
from shoal.pipeline.skippipe import PeerSpec, ScheduleInfeasible, SkipPipeConfig, schedule
from shoal.pipeline.worker import residual_scale

Route = list[tuple[int, str | None]]  # (block stage, preferred peer or None), in visiting order

# SkipPipe's visit cap: up to this share above an even spread of the skips, so the scheduler
# can shift visits off a slow stage (pipeline/skippipe.py, `visit_slack`)
SKIP_VISIT_SLACK = 0.25
# A never-measured peer is planned at the median measured speed of the others, or at this
# (seconds per token of a forward hop: a guess that only orders unmeasured peers).
DEFAULT_SECONDS_PER_TOKEN = 1e-4


class PathPlanner(ABC):
    name = ""
    num_stages: int

    @abstractmethod
    def plan(
        self, microbatches: int, tokens: int, served: Mapping[int, Sequence[str]]
    ) -> list[Route]:
        """One route per microbatch of an inner step (`tokens` per microbatch), given the
        live peers serving each block stage (read on the event loop; planning may run on
        another thread)."""

    def residual_scale(self, stage: int, route: Route) -> float:
        """The residual scale of `stage`'s training forward on `route` (1: none)."""
        return 1.0

    def describe(self) -> dict:
        return {"paths": self.name}


class FullPaths(PathPlanner):
    name = "full"

    def __init__(self, num_stages: int, swap_fraction: float = 0.0) -> None:
        if not 0.0 <= swap_fraction <= 1.0:
            raise ValueError(f"--out-of-order must be in [0, 1], got {swap_fraction}")
        if swap_fraction and num_stages < 3:
            raise ValueError("--out-of-order needs at least two block stages (--stages >= 3)")
        self.num_stages, self.swap_fraction = num_stages, swap_fraction

    def plan(
        self, microbatches: int, tokens: int, served: Mapping[int, Sequence[str]] | None = None
    ) -> list[Route]:
        return [self.route(swapped=self.is_swapped(m)) for m in range(microbatches)]

    def is_swapped(self, m: int) -> bool:
        """Microbatch m runs swapped when ⌊(m+1)·f⌋ > ⌊m·f⌋: exactly round-down(M·f) of M,
        spread evenly."""
        return int((m + 1) * self.swap_fraction) > int(m * self.swap_fraction)

    def route(self, swapped: bool = False) -> Route:
        stages = list(range(1, self.num_stages))
        if swapped:
            stages[0], stages[1] = stages[1], stages[0]
            if len(stages) >= 4:  # with 2 or 3 block stages the last pair overlaps the first
                stages[-1], stages[-2] = stages[-2], stages[-1]
        return [(stage, None) for stage in stages]

    def describe(self) -> dict:
        return {"paths": self.name, "out_of_order": self.swap_fraction}


class SkipPaths(PathPlanner):
    name = "skippipe"

    def __init__(
        self, config: SkipPipeConfig, driver_id: str, router: Router, rescale: str = "none"
    ) -> None:
        self.config, self.driver_id, self.router = config, driver_id, router
        self.num_stages = config.num_stages
        self.rescale = rescale
        # share 0: the paths hold only kept stages, so no training forward needs a scale
        self._scale = residual_scale(rescale, config.visit_share) if config.visit_share else 1.0
        self.last_iteration_s: float | None = None  # the scheduler's estimate for the last plan
        self.fallbacks = 0  # steps planned as the full pipeline (too few stages served)

    def plan(
        self, microbatches: int, tokens: int, served: Mapping[int, Sequence[str]]
    ) -> list[Route]:
        peers = self._specs(tokens, served)
        config = dataclasses.replace(self.config, num_microbatches=microbatches)
        try:
            plan = schedule(peers, config)
        except ScheduleInfeasible:
            self.fallbacks += 1
            return FullPaths(self.num_stages).plan(microbatches, tokens)
        self.last_iteration_s = plan.iteration_time_s
        return [[(stage, peer) for stage, peer in plan.paths[m][1:-1]] for m in range(microbatches)]

    def residual_scale(self, stage: int, route: Route) -> float:
        """p^−1/2 (or 1/p) for a stage that is not kept, on a path that skips; 1 on the
        full pipeline's paths (a step planned as the full pipeline)."""
        if len(route) >= self.num_stages - 1 or stage in self.config.always_visit:
            return 1.0
        return self._scale

    def _specs(self, tokens: int, served: Mapping[int, Sequence[str]]) -> list[PeerSpec]:
        """The live stage peers with their measured forward time for `tokens` tokens."""
        measured = {
            p: t for peers in served.values() for p in peers if (t := self.router.throughput(p))
        }
        default = (
            tokens / statistics.median(measured.values())
            if measured
            else tokens * DEFAULT_SECONDS_PER_TOKEN
        )
        specs = [PeerSpec(self.driver_id, 0, forward_s=1e-6)]  # the embedding: next to nothing
        for stage, peers in served.items():
            specs += [
                PeerSpec(p, stage, forward_s=tokens / measured[p] if p in measured else default)
                for p in peers
            ]
        return specs

    def describe(self) -> dict:
        return {
            "paths": self.name,
            "skip_ratio": self.config.skip_ratio,
            "stages_per_path": self.config.visits_per_path,
            "max_swaps": self.config.max_swaps,
            "kept_stages": list(self.config.always_visit),
            "rescale": self.rescale,
            "residual_scale": self._scale,
            "estimated_iteration_s": self.last_iteration_s,
            "fallbacks": self.fallbacks,
        }


def build_paths(
    num_stages: int,
    skip_ratio: float,
    out_of_order: float,
    driver_id: str,
    router: Router,
    skip_swaps: int = 0,
    skip_keep: tuple[int, ...] = (1,),
    skip_rescale: str = "none",
) -> PathPlanner:
    """The planner for `--skip-ratio` (SkipPipe when > 0; `--skip-swaps`, `--skip-keep`,
    `--skip-rescale`) and `--out-of-order` (CheckFree+)."""
    if skip_ratio and out_of_order:
        raise ValueError("--skip-ratio and --out-of-order are two path policies; pick one")
    if skip_ratio:
        config = SkipPipeConfig(
            num_stages=num_stages,
            skip_ratio=skip_ratio,
            max_swaps=skip_swaps,
            always_visit=tuple(skip_keep),
            visit_slack=SKIP_VISIT_SLACK,
        )
        return SkipPaths(config, driver_id, router, skip_rescale)
    return FullPaths(num_stages, out_of_order)
