"""SkipPipe's path search: one iteration planned microbatch by microbatch, each by a
time-aware A* over partial paths (the constraints are `skippipe_config.py`'s, the time
model `skippipe_timeline.py`'s).

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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from shoal.pipeline.skippipe_config import (
    Hop,
    LinkDelays,
    PeerSpec,
    Schedule,
    ScheduleInfeasible,
    SkipPipeConfig,
    Task,
    validate_peers,
)
from shoal.pipeline.skippipe_timeline import PeerTimeline, link_function


@dataclass
class PartialPath:
    """A path being searched: the forward hops placed so far."""

    stages: tuple[int, ...]
    peers: tuple[str, ...]
    forward: tuple[tuple[float, float], ...]  # (start, end) per hop
    max_stage: int
    pending: int | None  # stage owed after a started swap (s+1 was run before s)
    swaps: int


class SkipPipePlanner:
    """Plans the microbatches of one iteration in turn against the peers' timelines; the
    visit cap and floor are set by `skippipe.schedule` between attempts."""

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
        self.spec = validate_peers(peers, config.num_stages)
        self.by_stage: dict[int, list[str]] = {s: [] for s in range(config.num_stages)}
        for peer_id in sorted(self.spec):
            self.by_stage[self.spec[peer_id].stage_index].append(peer_id)
        self.forward_s = {p: s.forward_s for p, s in self.spec.items()}
        self.backward_s = {
            p: s.backward_s if s.backward_s is not None else config.backward_factor * s.forward_s
            for p, s in self.spec.items()
        }
        self.link = link_function(link_delay_s, peers, config.transfer_s)
        others = [p for p, s in self.spec.items() if s.stage_index != 0]
        self.min_forward = min((self.forward_s[p] for p in others), default=0.0)
        self.min_backward = min((self.backward_s[p] for p in others), default=0.0)
        self.timelines = {p: PeerTimeline(s.memory_cap) for p, s in self.spec.items()}
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

    def plan(self, m: int) -> tuple[PartialPath, list[tuple[str, int, str, float, float]]]:
        """A* for microbatch m; returns its forward hops and its loss + backward tasks."""
        mem_free = {p: t.memory_free_from() for p, t in self.timelines.items()}
        pruned = Counter[str]()
        # (f, -depth, order, node, loss + backward tasks); at equal f the deeper node first
        # (a complete path deepest of all), so ties do not widen the search
        heap: list[tuple[float, int, int, PartialPath, list]] = []
        pushed = itertools.count()

        def push(f: float, node: PartialPath, backward: list) -> None:
            depth = len(node.stages) + (1 if backward else 0)
            heapq.heappush(heap, (f, -depth, next(pushed), node, backward))

        for p0 in self.by_stage[0]:
            start = self.timelines[p0].earliest_start(mem_free[p0], self.forward_s[p0])
            node = PartialPath((0,), (p0,), ((start, start + self.forward_s[p0]),), 0, None, 0)
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
                    child = PartialPath(
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

    def next_stages(
        self, node: PartialPath, pruned: Counter[str]
    ) -> list[tuple[int, int | None, int]]:
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

    def lower_bound(self, node: PartialPath) -> float:
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

    def finish(self, node: PartialPath) -> list[tuple[str, int, str, float, float]]:
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
