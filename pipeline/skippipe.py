"""SkipPipe path scheduler: which stages, and which peer of each, every microbatch visits.

SkipPipe (Blagoev et al. 2025, arXiv 2502.19913) lets each microbatch skip some pipeline
stages and run pairs of adjacent stages swapped, so that one iteration needs less compute on
the critical path and slow peers or links are used less. This module plans one iteration,
as a pure function of its inputs (no clock, no randomness, no torch):

    plan = schedule(peers, SkipPipeConfig(num_stages=6, num_microbatches=12), link_delay_s)
    plan.paths[m]                 # ((0, "a"), (2, "c"), (3, "d"), (5, "f"), (0, "a"))
    plan.next_hop[(m, "c")]       # "d": where the runtime sends m's activations from "c"
    plan.iteration_time_s         # simulated makespan of forward + loss + backward
    baseline = full_pipeline_schedule(peers, config, link_delay_s)   # every stage, in order

Call `schedule(...)` again whenever a peer joins, leaves or changes speed (a re-measured
`forward_s`) or a link changes: recomputing the plan is the whole recovery story. Ties break
on stage indices and peer ids, so the plan does not depend on the order `peers` is given in.

The parts, one file each:

* `skippipe_config.py`: `PeerSpec`, `SkipPipeConfig` (and how it reads the paper's path
  constraints), the plan `Schedule` of `Task`s, `ScheduleInfeasible`;
* `skippipe_timeline.py`: the time model (per-peer timelines, hop times);
* `skippipe_search.py`: the greedy, time-aware A* that plans each microbatch's path;
* this file: `schedule` (retries the search with a looser visit cap or floor when the greedy
  corners itself) and the `full_pipeline_schedule` baseline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shoal.pipeline.skippipe_config import (
    Hop,
    LinkDelays,
    PeerSpec,
    Schedule,
    ScheduleInfeasible,
    SkipPipeConfig,
    Task,
)
from shoal.pipeline.skippipe_search import SkipPipePlanner

__all__ = [
    "Hop",
    "LinkDelays",
    "PeerSpec",
    "Schedule",
    "ScheduleInfeasible",
    "SkipPipeConfig",
    "Task",
    "full_pipeline_schedule",
    "schedule",
]


def schedule(
    peers: Sequence[PeerSpec], config: SkipPipeConfig, link_delay_s: LinkDelays | None = None
) -> Schedule:
    """SkipPipe plan of one iteration for the swarm as it is now (see the module docstring)."""
    k = config.visits_per_path

    def planner_for() -> SkipPipePlanner:
        return SkipPipePlanner(
            peers,
            config,
            k,
            None,
            config.max_swaps,
            config.max_jump,
            None,
            link_delay_s,
            config.always_visit,
        )

    planner = planner_for()
    served = planner.served()
    if not planner.by_stage[0]:
        raise ScheduleInfeasible("no peer serves stage 0 (embedding + loss)", ("coverage",))
    if len(served) < k - 1:
        raise ScheduleInfeasible(
            f"paths visit {k} stages but only stage 0 and {len(served)} others have peers "
            f"({served}); lower stages_per_path",
            ("coverage",),
        )
    unserved_kept = sorted(set(config.always_visit) - set(served))
    if unserved_kept:
        raise ScheduleInfeasible(f"no peer serves the kept stages {unserved_kept}", ("coverage",))
    m_total, free = config.num_microbatches, planner.free_visits
    free_stages = len(planner.served_free())
    even = m_total * free / free_stages if free else m_total
    cap = config.stage_visit_cap or min(
        m_total, math.ceil(round(even * (1 + config.visit_slack), 9))
    )
    if cap * free_stages < m_total * free:
        raise ScheduleInfeasible(
            f"stage_visit_cap={cap} x {free_stages} stages < {m_total} microbatches x "
            f"{free} non-zero stages each (kept stages {list(config.always_visit)} aside)",
            ("visit_cap",),
        )
    floor = (
        math.floor(round(even * (1 - config.visit_slack), 9))
        if config.visit_slack and not config.stage_visit_cap
        else 0
    )
    while True:
        planner.visit_cap, planner.visit_floor = cap, floor
        try:
            return planner.run()
        except ScheduleInfeasible as exc:
            # The greedy can corner itself when path shapes leave few usable stage sets; the
            # default cap is then the smallest one it succeeds with (the floor the largest).
            # A set cap is kept.
            if "visit_floor" in exc.constraints and floor > 0:
                floor -= 1
            elif config.stage_visit_cap or "visit_cap" not in exc.constraints or cap >= m_total:
                raise
            else:
                cap += 1
        planner = planner_for()


def full_pipeline_schedule(
    peers: Sequence[PeerSpec], config: SkipPipeConfig, link_delay_s: LinkDelays | None = None
) -> Schedule:
    """Baseline: every microbatch visits stages 0, 1, ..., S-1 in order (same time model);
    only the peer of each stage is chosen. The config's skip fields are ignored."""
    stages = config.num_stages
    planner = SkipPipePlanner(
        peers, config, stages, None, 0, stages, tuple(range(1, stages)), link_delay_s
    )
    missing = [s for s in range(stages) if not planner.by_stage[s]]
    if missing:
        raise ScheduleInfeasible(f"no peer serves stages {missing}", ("coverage",))
    return planner.run()
