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

Reading of the paper's constraints, as implemented
--------------------------------------------------
* Stage 0 holds the embedding and the loss head: a path starts at a stage-0 peer, visits its
  other stages, and returns to the *same* stage-0 peer for the loss; the backward pass walks
  the path in reverse and ends there.
* Stages visited, stage 0 counted once: k = S - round(skip_ratio * S); the default skip ratio
  1/3 with S = 6 gives "4 of 6" = stage 0 plus 3 of stages 1..5 (k >= 2: with S = 2 no
  stage is skipped). `stages_per_path` sets k directly.
* No stage twice. Jumps: |next - current| <= max_jump along the path, the first hop from 0
  included; the return to the loss counts as a jump from the last stage to S (the loss
  follows the last layer), so at most max_jump - 1 trailing stages may be skipped.
* Order: increasing, except up to max_swaps disjoint pairs of consecutive stages (s, s+1),
  both visited, run as (s+1, s) (the paper's out-of-order execution).
* Kept stages (`always_visit`): block stages every path visits. The paper's stage 0 holds
  the embedding *and the first layers*, so its paths always run those layers (so does its
  reference trainer); here stage 0 holds no block, and keeping the first block stage
  (`always_visit=(1,)`, the runtime's default) restores that. A kept stage is never jumped
  over nor swapped (as the paper's stage 0 always runs its layers first), and a path keeps
  enough visits for the kept stages still ahead of it.
* Visit cap: each non-zero stage that is not kept is visited by at most `stage_visit_cap`
  microbatches per iteration; default ceil(M * (k - 1 - K) / (n - K) * (1 + visit_slack)),
  n = non-zero stages with a peer, K = kept stages: slack 0 spreads the skips evenly, a
  slack lets the time-aware search give a slow stage fewer visits (with a kept stage the
  even share is often exact, which leaves it no choice of stages at all; the runtime uses
  0.25). With a slack each such stage is also visited at least floor(even * (1 -
  visit_slack)) times, so no stage falls far behind in training. The cap is raised (the
  floor lowered) one at a time if the greedy below corners itself with it; a kept
  stage is visited by every microbatch. A path
  is also refused if, after it, the remaining microbatches could no longer pick k - 1 - K
  distinct stages that are not kept under the caps (sum_s min(cap_left_s, r) >=
  r * (k - 1 - K), necessary and sufficient when every stage set is a valid path, e.g.
  S <= 6 at max_jump 4).
* Memory cap: a peer holds a microbatch from the start of its forward to the end of its
  backward there; at no moment may it hold more than `memory_cap`. A peer whose memory is
  full is not offered to a forward until it frees for good, so the cap delays work but never
  makes a plan infeasible.
* One task at a time per peer (forward, loss or backward of one microbatch).

Time model: forward takes `forward_s`, backward `backward_s` (default backward_factor x
forward), the loss `loss_s` on the stage-0 peer; a hop between two peers takes
link_delay_s(a, b) + transfer_s. Links are not a shared resource. Tasks go into the earliest
idle gap of the peer's timeline, so later microbatches fill the bubbles of earlier ones.

Algorithm: microbatches are planned one after another (greedy). For each, best-first (A*)
over partial paths, ordered by a lower bound of the finish time: the forwards placed so far
against the timelines of the microbatches already planned, the stages still to visit at the
fastest speed, then the backward through the chosen peers' timelines. A complete path is
evaluated exactly (loss, then backward in reverse) and pushed back with its finish time, so
the first complete path popped is the earliest to finish among those searched. To keep large
swarms tractable, a partial path is dropped when one ending at the same peer, from the same
stage-0 peer, over the same stages, with a forward no later and a bound no worse was already
expanded; this ignores the earlier peers' backward queues, so the optimum is not guaranteed.
Choices that break a constraint are not generated; if none is left, `ScheduleInfeasible`
names the constraints that pruned the search. Cost: about 0.3 s for 8 stages x 1-3 peers and
32 microbatches, about 2 s per attempt for 12 stages x 4 peers (CPython, one core).
"""

from __future__ import annotations

import heapq
import itertools
import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Hop = tuple[int, str]  # (stage_index, peer_id)
LinkDelays = (
    Callable[[str, str], float] | Mapping[tuple[str, str], float] | Sequence[Sequence[float]]
)


class ScheduleInfeasible(ValueError):
    """No plan satisfies the constraints; `constraints` names the ones that ruled paths out
    ("coverage", "visit_cap", "visit_floor", "max_jump", "always_visit", "max_expansions"), `microbatch` the one that failed
    (None when detected before the search)."""

    def __init__(self, message: str, constraints: tuple[str, ...], microbatch: int | None = None):
        super().__init__(message)
        self.constraints = constraints
        self.microbatch = microbatch


@dataclass(frozen=True)
class PeerSpec:
    """One peer as the scheduler sees it: the stage it serves and its measured speed."""

    peer_id: str
    stage_index: int
    forward_s: float  # compute time of one microbatch's forward on this peer
    backward_s: float | None = None  # None: SkipPipeConfig.backward_factor * forward_s
    loss_s: float = 0.0  # loss + head time (stage-0 peers only)
    memory_cap: int | None = None  # most microbatches held at once; None: unlimited


@dataclass(frozen=True)
class SkipPipeConfig:
    num_stages: int = 6
    num_microbatches: int = 8
    skip_ratio: float = 1 / 3  # skipped stages / all stages; stage 0 is never skipped
    stages_per_path: int | None = None  # k, stage 0 counted; overrides skip_ratio
    max_jump: int = 4
    max_swaps: int = 2
    always_visit: tuple[int, ...] = ()  # block stages on every path (the runtime keeps (1,))
    stage_visit_cap: int | None = (
        None  # None: ceil(M * (k - 1 - K) / (stages with a peer - K) * (1 + visit_slack))
    )
    visit_slack: float = 0.0  # the default cap's share above the even spread (the runtime: 0.25)
    backward_factor: float = 2.0
    transfer_s: float = 0.0  # per-hop transfer time of one microbatch's activations/grads
    max_expansions: int = 200_000  # A* budget per microbatch

    def __post_init__(self) -> None:
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, got {self.num_microbatches}")
        if not 0.0 <= self.skip_ratio < 1.0:
            raise ValueError(f"skip_ratio must be in [0, 1), got {self.skip_ratio}")
        if not 2 <= self.visits_per_path <= self.num_stages:
            raise ValueError(
                f"stages_per_path must be in [2, num_stages={self.num_stages}], "
                f"got {self.visits_per_path} (skip_ratio={self.skip_ratio})"
            )
        for name in ("max_jump", "stage_visit_cap", "max_expansions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_swaps < 0:
            raise ValueError(f"max_swaps must be >= 0, got {self.max_swaps}")
        kept = self.always_visit
        if len(set(kept)) < len(kept) or not all(1 <= s < self.num_stages for s in kept):
            raise ValueError(
                f"always_visit must list distinct block stages in 1..{self.num_stages - 1}, got {list(kept)}"
            )
        if len(kept) > self.visits_per_path - 1:
            raise ValueError(
                f"always_visit keeps {len(kept)} stages but paths visit only {self.visits_per_path - 1} "
                f"besides stage 0 (skip_ratio={self.skip_ratio})"
            )
        for name in ("backward_factor", "transfer_s", "visit_slack"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    @property
    def visits_per_path(self) -> int:
        if self.stages_per_path is not None:
            return self.stages_per_path
        skipped = math.floor(self.skip_ratio * self.num_stages + 0.5)
        return max(2, self.num_stages - skipped)  # a path needs one stage besides 0

    @property
    def visit_share(self) -> float:
        """The share of paths that visit a block stage that is not kept, with every block
        stage served: (k − 1 − K) / (S − 1 − K); 1 when every block stage is kept."""
        kept = len(self.always_visit)
        free_stages = self.num_stages - 1 - kept
        return (self.visits_per_path - 1 - kept) / free_stages if free_stages else 1.0


@dataclass(frozen=True)
class Task:
    microbatch: int
    peer_id: str
    stage_index: int
    kind: str  # "forward" | "loss" | "backward"
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Schedule:
    paths: dict[int, tuple[Hop, ...]]  # first and last hop: the same stage-0 peer
    next_hop: dict[tuple[int, str], str]  # forward direction; backward walks paths reversed
    tasks: tuple[Task, ...]  # sorted by (start_s, peer_id, microbatch)
    finish_s: dict[int, float]  # end of each microbatch's last backward
    iteration_time_s: float  # makespan
    stage_visit_cap: int | None = None  # the cap the plan obeyed (None: baseline)
    stage_visit_floor: int = 0  # the least visits of every stage that is not kept


class _Timeline:
    """One peer's busy intervals (sorted, disjoint) and held-microbatch intervals."""

    def __init__(self, memory_cap: int | None) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.holds: list[tuple[float, float]] = []
        self.memory_cap = memory_cap

    def earliest_start(self, ready_s: float, duration_s: float) -> float:
        start = ready_s
        for index in range(bisect_right(self.ends, start), len(self.starts)):
            if self.starts[index] >= start + duration_s:
                break  # fits in the gap before this interval
            start = max(start, self.ends[index])
        return start

    def occupy(self, start_s: float, end_s: float) -> None:
        if end_s > start_s:  # zero-length tasks take no slot
            index = bisect_right(self.starts, start_s)
            self.starts.insert(index, start_s)
            self.ends.insert(index, end_s)

    def memory_free_from(self) -> float:
        """Earliest time after which fewer than memory_cap microbatches are ever held."""
        if self.memory_cap is None or len(self.holds) < self.memory_cap:
            return 0.0
        events = sorted([(end, -1) for _, end in self.holds] + [(s, 1) for s, _ in self.holds])
        held, free_s = 0, 0.0
        for time_s, delta in events:  # ends sort first: intervals are half-open
            held += delta
            if delta < 0 and held == self.memory_cap - 1:
                free_s = time_s
        return free_s


@dataclass
class _Node:
    stages: tuple[int, ...]
    peers: tuple[str, ...]
    forward: tuple[tuple[float, float], ...]  # (start, end) per hop
    max_stage: int
    pending: int | None  # stage owed after a started swap (s+1 was run before s)
    swaps: int


class _Planner:
    def __init__(
        self,
        peers: Sequence[PeerSpec],
        config: SkipPipeConfig,
        visits: int,
        visit_cap: int | None,
        max_swaps: int,
        max_jump: int,
        fixed_order: tuple[int, ...] | None,
        link_delay_s: LinkDelays | None,
        kept: tuple[int, ...] = (),
    ) -> None:
        self.config, self.visits, self.visit_cap = config, visits, visit_cap
        self.visit_floor = 0
        self.max_swaps, self.max_jump, self.fixed_order = max_swaps, max_jump, fixed_order
        self.kept = frozenset(kept)
        self.free_visits = visits - 1 - len(self.kept)  # per path, on stages that are not kept
        self.spec = _validate_peers(peers, config.num_stages)
        self.by_stage: dict[int, list[str]] = {s: [] for s in range(config.num_stages)}
        for peer_id in sorted(self.spec):
            self.by_stage[self.spec[peer_id].stage_index].append(peer_id)
        self.forward_s = {p: s.forward_s for p, s in self.spec.items()}
        self.backward_s = {
            p: s.backward_s if s.backward_s is not None else config.backward_factor * s.forward_s
            for p, s in self.spec.items()
        }
        self.link = _link_function(link_delay_s, peers, config.transfer_s)
        others = [p for p, s in self.spec.items() if s.stage_index != 0]
        self.min_forward = min((self.forward_s[p] for p in others), default=0.0)
        self.min_backward = min((self.backward_s[p] for p in others), default=0.0)
        self.timelines = {p: _Timeline(s.memory_cap) for p, s in self.spec.items()}
        self.visit_counts = Counter[int]()

    def served(self) -> list[int]:
        return [s for s in range(1, self.config.num_stages) if self.by_stage[s]]

    def served_free(self) -> list[int]:
        """Served stages that are not kept: the ones skips are spread over."""
        return [s for s in self.served() if s not in self.kept]

    def run(self) -> Schedule:
        tasks: list[Task] = []
        paths: dict[int, tuple[Hop, ...]] = {}
        finish: dict[int, float] = {}
        for m in range(self.config.num_microbatches):
            node, backward = self.plan(m)
            p0 = node.peers[0]
            paths[m] = tuple(zip(node.stages, node.peers, strict=True)) + ((0, p0),)
            for stage, peer, (start, end) in zip(
                node.stages, node.peers, node.forward, strict=True
            ):
                tasks.append(Task(m, peer, stage, "forward", start, end))
                self.timelines[peer].occupy(start, end)
                self.visit_counts[stage] += 1
            for peer, stage, kind, start, end in backward:
                tasks.append(Task(m, peer, stage, kind, start, end))
                self.timelines[peer].occupy(start, end)
            backward_end = {peer: end for peer, _, _, _, end in backward}  # p0: its last one
            for peer, (start, _) in zip(node.peers, node.forward, strict=True):
                self.timelines[peer].holds.append((start, backward_end[peer]))
            finish[m] = backward[-1][4]
        next_hop = {
            (m, path[i][1]): path[i + 1][1]
            for m, path in paths.items()
            for i in range(len(path) - 1)
        }
        tasks.sort(key=lambda t: (t.start_s, t.peer_id, t.microbatch, t.kind))
        return Schedule(
            paths,
            next_hop,
            tuple(tasks),
            finish,
            max(finish.values()),
            self.visit_cap,
            self.visit_floor,
        )

    def plan(self, m: int) -> tuple[_Node, list[tuple[str, int, str, float, float]]]:
        """A* for microbatch m; returns its forward hops and its loss + backward tasks."""
        mem_free = {p: t.memory_free_from() for p, t in self.timelines.items()}
        pruned = Counter[str]()
        # (f, -depth, order, node, loss + backward tasks); at equal f the deeper node first
        # (a complete path deepest of all), so ties do not widen the search
        heap: list[tuple[float, int, int, _Node, list]] = []
        pushed = itertools.count()

        def push(f: float, node: _Node, backward: list) -> None:
            depth = len(node.stages) + (1 if backward else 0)
            heapq.heappush(heap, (f, -depth, next(pushed), node, backward))

        for p0 in self.by_stage[0]:
            start = self.timelines[p0].earliest_start(mem_free[p0], self.forward_s[p0])
            node = _Node((0,), (p0,), ((start, start + self.forward_s[p0]),), 0, None, 0)
            push(self.lower_bound(node), node, [])
        expansions = 0
        expanded: dict[tuple, list[tuple[float, float]]] = {}
        while heap:
            f, _, _, node, backward = heapq.heappop(heap)
            if backward:
                return node, backward
            # Dominance: a node reaching the same peer, having visited the same stages from the
            # same stage-0 peer, with a forward no later and a bound no worse, was expanded.
            key = (node.peers[0], node.peers[-1], frozenset(node.stages), node.pending, node.swaps)
            g = node.forward[-1][1]
            if any(g0 <= g and f0 <= f for g0, f0 in expanded.get(key, ())):
                continue
            expanded.setdefault(key, []).append((g, f))
            expansions += 1
            if expansions > self.config.max_expansions:
                raise ScheduleInfeasible(
                    f"microbatch {m}: A* gave up after max_expansions="
                    f"{self.config.max_expansions}; raise it",
                    ("max_expansions",),
                    m,
                )
            if len(node.stages) == self.visits and node.pending is None:
                if self.config.num_stages - node.stages[-1] > self.max_jump:
                    pruned["max_jump"] += 1
                elif not self.caps_leave_room(node.stages, m):
                    pruned["visit_cap"] += 1
                elif not self.floors_reachable(node.stages, m):
                    pruned["visit_floor"] += 1
                else:
                    backward = self.finish(node)
                    push(backward[-1][4], node, backward)
                continue
            for stage, pending, swaps in self.next_stages(node, pruned):
                for peer in self.by_stage[stage]:
                    ready = node.forward[-1][1] + self.link(node.peers[-1], peer)
                    start = self.timelines[peer].earliest_start(
                        max(ready, mem_free[peer]), self.forward_s[peer]
                    )
                    end = start + self.forward_s[peer]
                    child = _Node(
                        node.stages + (stage,),
                        node.peers + (peer,),
                        node.forward + ((start, end),),
                        max(node.max_stage, stage),
                        pending,
                        swaps,
                    )
                    push(self.lower_bound(child), child, [])

        reasons = ", ".join(f"{name} ({count} choices)" for name, count in sorted(pruned.items()))
        raise ScheduleInfeasible(
            f"microbatch {m}: no path of {self.visits} stages satisfies the constraints; "
            f"pruned by: {reasons or 'nothing (no candidate stages)'}",
            tuple(sorted(pruned)) or ("coverage",),
            m,
        )

    def next_stages(self, node: _Node, pruned: Counter[str]) -> list[tuple[int, int | None, int]]:
        """(stage, pending, swaps) choices for the next hop under the order/jump/cap rules."""
        last = node.stages[-1]
        if self.fixed_order is not None:
            options = [(self.fixed_order[len(node.stages) - 1], None, 0)]
        elif node.pending is not None:
            options = [(node.pending, None, node.swaps)]
        else:
            options = []
            # a kept stage ahead may not be jumped over: the next hop goes no further than it
            ahead = [s for s in self.kept if s > node.max_stage]
            upto = min(ahead, default=self.config.num_stages - 1)
            for stage in range(node.max_stage + 1, upto + 1):
                options.append((stage, None, node.swaps))
                if (
                    node.swaps < self.max_swaps
                    and stage + 1 < self.config.num_stages
                    and len(node.stages) + 2 <= self.visits
                    and not {stage, stage + 1} & self.kept  # a kept stage holds its place
                ):
                    options.append((stage + 1, stage, node.swaps + 1))  # swap (stage, stage+1)
        chosen = []
        for stage, pending, swaps in options:
            top = max(stage, node.max_stage)
            owed = (pending is not None) + sum(1 for s in self.kept if s > top)
            if abs(stage - last) > self.max_jump:
                pruned["max_jump"] += 1
            elif self.visits - len(node.stages) - 1 < owed:
                pruned["always_visit"] += 1  # no visits left for the kept stages ahead
            elif not self.by_stage[stage] or (pending is not None and not self.by_stage[pending]):
                pruned["coverage"] += 1
            elif self.at_cap(stage) or (pending is not None and self.at_cap(pending)):
                pruned["visit_cap"] += 1
            else:
                chosen.append((stage, pending, swaps))
        return chosen

    def at_cap(self, stage: int) -> bool:
        if self.visit_cap is None or stage in self.kept:
            return False
        return self.visit_counts[stage] >= self.visit_cap

    def caps_leave_room(self, stages: tuple[int, ...], m: int) -> bool:
        """Can the microbatches after m still each pick their distinct stages that are not
        kept (free_visits of them)?"""
        if self.visit_cap is None:
            return True
        left = self.config.num_microbatches - m - 1
        room = sum(
            min(self.visit_cap - self.visit_counts[s] - (s in stages), left)
            for s in self.served_free()
        )
        return room >= left * self.free_visits

    def floors_reachable(self, stages: tuple[int, ...], m: int) -> bool:
        """Can the microbatches after m still bring every stage that is not kept up to the
        floor (at most one visit to a stage per microbatch, free_visits per microbatch)?"""
        left = self.config.num_microbatches - m - 1
        deficits = [
            max(0, self.visit_floor - self.visit_counts[s] - (s in stages))
            for s in self.served_free()
        ]
        return max(deficits, default=0) <= left and sum(deficits) <= left * self.free_visits

    def lower_bound(self, node: _Node) -> float:
        """Admissible A* estimate of a partial path's finish time: its stages still to visit
        at the fastest speed and transfer_s per hop, then the backward through the peers
        already chosen, each in the earliest gap of its timeline (queueing included)."""
        stages_left = self.visits - len(node.stages)
        arrival = (
            node.forward[-1][1]
            + stages_left * (self.min_forward + self.min_backward)
            + self.spec[node.peers[0]].loss_s
            + 2 * (stages_left + 1) * self.config.transfer_s  # hops there and back
        )
        for index in range(len(node.peers) - 1, -1, -1):
            peer = node.peers[index]
            # earliest_start is monotone in the ready time, so this never overestimates
            end = self.timelines[peer].earliest_start(arrival, self.backward_s[peer])
            end += self.backward_s[peer]
            arrival = end + (self.link(peer, node.peers[index - 1]) if index else 0.0)
        return arrival

    def finish(self, node: _Node) -> list[tuple[str, int, str, float, float]]:
        """Exact loss + backward placement for a complete path: (peer, stage, kind, start, end)."""
        p0 = node.peers[0]
        ready = node.forward[-1][1] + self.link(node.peers[-1], p0)
        start = self.timelines[p0].earliest_start(ready, self.spec[p0].loss_s)
        tasks = [(p0, 0, "loss", start, start + self.spec[p0].loss_s)]
        previous = p0
        for stage, peer in zip(reversed(node.stages), reversed(node.peers), strict=True):
            ready = tasks[-1][4] + self.link(previous, peer)
            start = self.timelines[peer].earliest_start(ready, self.backward_s[peer])
            tasks.append((peer, stage, "backward", start, start + self.backward_s[peer]))
            previous = peer
        return tasks


def schedule(
    peers: Sequence[PeerSpec], config: SkipPipeConfig, link_delay_s: LinkDelays | None = None
) -> Schedule:
    """SkipPipe plan of one iteration for the swarm as it is now (see the module docstring)."""
    k = config.visits_per_path

    def planner_for() -> _Planner:
        return _Planner(
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
    planner = _Planner(
        peers, config, stages, None, 0, stages, tuple(range(1, stages)), link_delay_s
    )
    missing = [s for s in range(stages) if not planner.by_stage[s]]
    if missing:
        raise ScheduleInfeasible(f"no peer serves stages {missing}", ("coverage",))
    return planner.run()


def _validate_peers(peers: Sequence[PeerSpec], num_stages: int) -> dict[str, PeerSpec]:
    spec: dict[str, PeerSpec] = {}
    for peer in peers:
        if peer.peer_id in spec:
            raise ValueError(f"peer id {peer.peer_id!r} appears twice")
        if not 0 <= peer.stage_index < num_stages:
            raise ValueError(
                f"peer {peer.peer_id!r}: stage_index {peer.stage_index} not in [0, {num_stages})"
            )
        for name in ("forward_s", "backward_s", "loss_s"):
            value = getattr(peer, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"peer {peer.peer_id!r}: {name} must be finite and >= 0, got {value}"
                )
        if peer.forward_s <= 0:
            raise ValueError(f"peer {peer.peer_id!r}: forward_s must be > 0, got {peer.forward_s}")
        if peer.memory_cap is not None and peer.memory_cap < 1:
            raise ValueError(
                f"peer {peer.peer_id!r}: memory_cap must be >= 1 or None, got {peer.memory_cap}"
            )
        spec[peer.peer_id] = peer
    return spec


def _link_function(
    link_delay_s: LinkDelays | None, peers: Sequence[PeerSpec], transfer_s: float
) -> Callable[[str, str], float]:
    """Hop time a -> b: 0 on the same peer, else link delay + transfer_s (validated, cached)."""
    if link_delay_s is None:

        def delay(a: str, b: str) -> float:
            return 0.0
    elif callable(link_delay_s):
        delay = link_delay_s
    elif isinstance(link_delay_s, Mapping):
        table = link_delay_s

        def delay(a: str, b: str) -> float:
            return table.get((a, b), table.get((b, a), 0.0))
    else:
        ids = [p.peer_id for p in peers]
        if len(link_delay_s) != len(ids) or any(len(row) != len(ids) for row in link_delay_s):
            raise ValueError(f"link delay matrix must be {len(ids)}x{len(ids)} (peers order)")
        index = {peer_id: i for i, peer_id in enumerate(ids)}
        matrix = link_delay_s

        def delay(a: str, b: str) -> float:
            return matrix[index[a]][index[b]]

    cache: dict[tuple[str, str], float] = {}

    def hop_s(a: str, b: str) -> float:
        if a == b:
            return 0.0
        if (a, b) not in cache:
            value = float(delay(a, b))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"link delay {a!r} -> {b!r} must be finite and >= 0, got {value}")
            cache[(a, b)] = value + transfer_s
        return cache[(a, b)]

    return hop_s
