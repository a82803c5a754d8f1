"""Routing: which peer of the next pipeline stage gets a microbatch.

Each stage is served by several interchangeable peers (replicas of the same layers) that
join, slow down and die. Before every hop the pipeline asks a `Router` for one peer among
the live ones serving that stage, then tells it how the task went:

    peer = router.choose(stage, live_peers, microbatch=m, task_size=1.0, backward=False)
    ... send the activations; on success ...
    router.report(peer, seconds=elapsed, task_size=1.0, backward=False)
    ... on unreachable / timeout / error ...
    router.failed(peer)          # banned for a while; choose() again to retry elsewhere

Two routers, chosen by name (`build_router`, `ROUTERS`):

* `random` (`RandomRouter`): NoLoCo's routing (Kolehmainen et al. 2025, arXiv 2506.10911):
  microbatches go to a random replica, balanced by walking a shuffled permutation.
* `swarm` (`SwarmRouter`): SWARM parallelism's stochastic wiring (Ryabinin et al. 2023,
  arXiv 2301.11913): send each task where it is projected to finish first, measuring each
  peer's throughput as it goes, so faster peers get proportionally more work.

Both share `PeerBook` (`peerbook.py`: per-peer measurements and the ban rule: a failed peer
is skipped for `ban_s`, doubling on repeat failures up to `max_ban_s`; a success resets the
count) and `Assignments` (which peer a microbatch went to at a stage, so that asking again
for the same microbatch, e.g. its backward pass, returns that peer while it stays usable).

Microbatch ids must be unique over the run (e.g. `step * per_step + index`): a repeated id
is taken as the same microbatch coming back. Everything is pure Python and deterministic
given the seed, the sequence of calls and the injected clock. The methods take a lock, so a
router may be shared by the event loop and the training thread.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from shoal.pipeline.peerbook import Assignments, PeerBook, PeerStats, RouterConfig

__all__ = [
    "ROUTERS",
    "Assignments",
    "Clock",
    "NoRoute",
    "PeerBook",
    "PeerStats",
    "RandomRouter",
    "Router",
    "RouterConfig",
    "RoutingError",
    "SwarmRouter",
    "build_router",
]

Clock = Callable[[], float]


class RoutingError(Exception):
    """Base of the errors raised by routers."""


class NoRoute(RoutingError):
    """No peer serves the stage: `choose` was given no candidates."""


def _peer_ids(candidates: Sequence[str], stage: int) -> list[str]:
    """Candidates deduplicated and sorted, so results do not depend on their order."""
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of peer ids, not a single string")
    peer_ids = sorted(set(candidates))
    if not peer_ids:
        raise NoRoute(f"no live peer serves stage {stage}")
    return peer_ids


def _check_task(task_size: float, seconds: float | None = None) -> None:
    if not (math.isfinite(task_size) and task_size > 0):
        raise ValueError(f"task_size must be a positive number, got {task_size!r}")
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds must be a non-negative number, got {seconds!r}")


_MIN_SECONDS = 1e-6  # a task timed at 0 s (coarse clock) counts as this long


class Router(ABC):
    """Chooses, per hop, the peer of the next stage that gets a microbatch."""

    name: str = ""

    def __init__(
        self, seed: int = 0, *, config: RouterConfig | None = None, clock: Clock = time.monotonic
    ) -> None:
        self.config = config or RouterConfig()
        self.clock = clock
        self.rng = random.Random(seed)
        self.book = PeerBook(self.config)
        self.assignments = Assignments(self.config.remember_microbatches)
        self._lock = threading.Lock()

    def choose(
        self,
        stage: int,
        candidates: Sequence[str],
        *,
        microbatch: int,
        task_size: float = 1.0,
        backward: bool = False,
        prefer: str | None = None,
    ) -> str:
        """One peer id from `candidates` (the live peers serving `stage`); NoRoute if empty.
        `prefer` (a path planner's choice) is taken if it is a usable candidate."""
        _check_task(task_size)
        with self._lock:
            peer_ids, now = self._begin(stage, candidates)
            usable = self.book.usable(peer_ids, now)
            if (
                prefer is not None
                and prefer in usable
                and self.book.peers[prefer].banned_until <= now
            ):
                self.assignments.remember(stage, microbatch, prefer)
                return prefer
            return self._pick(stage, peer_ids, usable, now, microbatch, task_size, backward)

    def throughput(self, peer_id: str) -> float | None:
        """The measured forward-equivalent task units per second of `peer_id` (None until
        measured)."""
        with self._lock:
            stats = self.book.peers.get(peer_id)
            return stats.throughput if stats is not None else None

    @abstractmethod
    def _pick(
        self,
        stage: int,
        peer_ids: list[str],
        usable: list[str],
        now: float,
        microbatch: int,
        task_size: float,
        backward: bool,
    ) -> str:
        """The router's rule, under the lock: a peer of `usable` (never empty), given every
        candidate of the stage in `peer_ids`."""

    def report(
        self, peer_id: str, *, seconds: float, task_size: float, backward: bool = False
    ) -> None:
        """A task finished on `peer_id` in `seconds`: update its throughput."""
        _check_task(task_size, seconds)
        with self._lock:
            now = self.clock()
            cost = self._cost(task_size, backward)
            self._settle(
                self.book.succeeded(peer_id, now, cost / max(seconds, _MIN_SECONDS)), cost, now
            )

    def failed(self, peer_id: str) -> None:
        """`peer_id` failed a task (unreachable, timeout, error): ban it for a while."""
        with self._lock:
            now = self.clock()
            stats = self.book.failed(peer_id, now)
            stats.pending_cost = 0.0  # its queued tasks are lost with it and will be retried
            stats.busy_until = min(stats.busy_until, now)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able per-peer stats for the dashboard (times on the router's clock)."""
        with self._lock:
            return {"router": self.name, "peers": self.book.snapshot(self.clock())}

    def _cost(self, task_size: float, backward: bool) -> float:
        return task_size * (self.config.backward_cost if backward else 1.0)

    def _settle(self, stats: PeerStats, cost: float, now: float) -> None:
        """A task is done: re-project busy_until from the work still queued (pending_cost,
        which only SwarmRouter books) at the updated throughput."""
        stats.pending_cost = max(0.0, stats.pending_cost - cost)
        if stats.pending_cost <= 1e-12 or stats.throughput is None:
            stats.pending_cost = 0.0
            stats.busy_until = min(stats.busy_until, now)
        else:
            stats.busy_until = now + stats.pending_cost / stats.throughput

    def _begin(self, stage: int, candidates: Sequence[str]) -> tuple[list[str], float]:
        peer_ids = _peer_ids(candidates, stage)
        now = self.clock()
        for peer_id in peer_ids:
            self.book.get(peer_id, now)  # created lazily; marks them seen before the sweep
        self.book.forget_stale(now)
        return peer_ids, now


class RandomRouter(Router):
    """NoLoCo's routing: a random replica per microbatch, balanced.

    Per stage a shuffled cycle of the current candidates; each new microbatch takes the
    next peer of the cycle, so n consecutive microbatches over n replicas use each once. The
    cycle is reshuffled when used up or when the candidate set changes. Banned peers are
    skipped (swapped later into the cycle) while an unbanned candidate exists. A microbatch
    asked for again (its backward pass, a retry) gets the peer it had if that peer is still
    usable, else a random usable one; either way it takes no new slot of the cycle.
    """

    name = "random"

    def __init__(
        self, seed: int = 0, *, config: RouterConfig | None = None, clock: Clock = time.monotonic
    ) -> None:
        super().__init__(seed, config=config, clock=clock)
        # stage -> (members, shuffled order, index of the next slot)
        self._cycles: dict[int, tuple[frozenset[str], list[str], int]] = {}

    def _pick(
        self,
        stage: int,
        peer_ids: list[str],
        usable: list[str],
        now: float,
        microbatch: int,
        task_size: float,
        backward: bool,
    ) -> str:
        previous = self.assignments.get(stage, microbatch)
        if previous in usable:
            return previous
        peer_id = (
            self.rng.choice(usable)
            if previous is not None
            else self._next_in_cycle(stage, peer_ids, set(usable))
        )
        self.assignments.remember(stage, microbatch, peer_id)
        return peer_id

    def _next_in_cycle(self, stage: int, peer_ids: list[str], usable: set[str]) -> str:
        members = frozenset(peer_ids)
        cycle = self._cycles.get(stage)
        for attempt in range(2):
            if attempt or cycle is None or cycle[0] != members or cycle[2] >= len(cycle[1]):
                order = list(peer_ids)
                self.rng.shuffle(order)
                cycle = (members, order, 0)
            members, order, index = cycle
            found = next((i for i in range(index, len(order)) if order[i] in usable), None)
            if found is not None:
                # Swap the chosen peer into this slot so a skipped (banned) one keeps its turn.
                order[index], order[found] = order[found], order[index]
                self._cycles[stage] = (members, order, index + 1)
                return order[index]
        # Unreachable: a fresh cycle holds every candidate and `usable` is a non-empty subset.
        raise AssertionError("usable peers outside the candidate set")


class SwarmRouter(Router):
    """SWARM's stochastic wiring: each task goes where it is projected to finish first.

    Per peer: an EMA of throughput (task units per second, weight `ema_alpha`) and a
    projected busy-until time. A task costs task_size (x backward_cost, about 2.5, for a
    backward pass). `choose` picks the unbanned candidate minimising

        max(now, busy_until[p]) + cost / throughput[p]

    then adds cost / throughput[p] to its busy_until, so load spreads in proportion to
    speed. A never-measured peer is given the throughput of the fastest measured candidate
    (default_throughput if none) and wins ties, so a newcomer is tried at once without
    being flooded; remaining ties go to a seeded RNG. `report` folds task_size x factor /
    seconds into the EMA and re-projects busy_until from the work still outstanding;
    `failed` bans the peer and drops its outstanding work. A backward pass of a microbatch
    goes to the peer that ran its forward at that stage (it holds the activations) while
    that peer is usable.
    """

    name = "swarm"

    def _pick(
        self,
        stage: int,
        peer_ids: list[str],
        usable: list[str],
        now: float,
        microbatch: int,
        task_size: float,
        backward: bool,
    ) -> str:
        cost = self._cost(task_size, backward)
        measured = [t for p in peer_ids if (t := self.book.peers[p].throughput) is not None]
        assumed = max(measured, default=self.config.default_throughput)
        forward_peer = self.assignments.get(stage, microbatch) if backward else None

        def projected_finish(peer_id: str) -> tuple[float, int, float]:
            stats = self.book.peers[peer_id]
            seconds = cost / (stats.throughput or assumed)
            return (
                max(now, stats.busy_until) + seconds,
                stats.throughput is not None,
                self.rng.random(),
            )

        peer_id = forward_peer if forward_peer in usable else min(usable, key=projected_finish)
        stats = self.book.peers[peer_id]
        if stats.busy_until <= now:
            # The projection says its queue drained; forget work whose report never came.
            stats.pending_cost = 0.0
        stats.pending_cost += cost
        stats.busy_until = max(now, stats.busy_until) + cost / (stats.throughput or assumed)
        self.assignments.remember(stage, microbatch, peer_id)
        return peer_id


ROUTERS: dict[str, type[Router]] = {"random": RandomRouter, "swarm": SwarmRouter}


def build_router(name: str, seed: int, *, clock: Clock = time.monotonic, **options: Any) -> Router:
    """The router registered as `name`; `options` are `RouterConfig` fields."""
    if name not in ROUTERS:
        raise ValueError(f"--router {name!r} is not one of {sorted(ROUTERS)}")
    known = {field.name for field in dataclasses.fields(RouterConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown routing option(s) {unknown}; known: {sorted(known)}")
    return ROUTERS[name](seed, config=RouterConfig(**options), clock=clock)
