"""What a router knows (pipeline/routing.py): its knobs (`RouterConfig`), per-peer
measurements and the one ban rule (`PeerBook`, `PeerStats`), and which peer each microbatch
went to at a stage (`Assignments`). Plain state, no locking: the routers hold their lock
around every call.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RouterConfig:
    """Knobs shared by the routers (each ignores those it has no use for)."""

    ban_s: float = 10.0  # first ban after a failure; doubles per repeat failure
    max_ban_s: float = 120.0  # cap on a single ban
    ema_alpha: float = 0.1  # weight of a new throughput sample in the EMA
    backward_cost: float = 2.5  # a backward task costs this many forward tasks
    default_throughput: float = 1.0  # task units/s assumed while no candidate is measured
    forget_after_s: float = 600.0  # drop the stats of a peer unseen for this long
    remember_microbatches: int = 4096  # (stage, microbatch) -> peer entries kept

    def __post_init__(self) -> None:
        for name in ("ban_s", "max_ban_s", "backward_cost", "default_throughput", "forget_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"routing option {name} must be a positive number, got {value!r}")
        if self.max_ban_s < self.ban_s:
            raise ValueError(
                f"routing option max_ban_s ({self.max_ban_s}) must be >= ban_s ({self.ban_s})"
            )
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ValueError(f"routing option ema_alpha must be in (0, 1], got {self.ema_alpha!r}")
        if self.remember_microbatches < 1:
            raise ValueError(
                "routing option remember_microbatches must be >= 1, "
                f"got {self.remember_microbatches!r}"
            )


@dataclass
class PeerStats:
    """What a router knows about one peer; times are on the router's clock."""

    throughput: float | None = None  # EMA of task units per second; None until measured
    busy_until: float = 0.0  # projected time the peer's queued work is done (swarm)
    pending_cost: float = 0.0  # task units sent to it and not yet reported (swarm)
    banned_until: float = 0.0
    ban_strikes: int = 0  # consecutive failures; sets the next ban's length
    tasks_done: int = 0
    tasks_failed: int = 0
    last_seen: float = 0.0


class PeerBook:
    """Per-peer stats, created lazily, plus the one ban rule both routers use."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.peers: dict[str, PeerStats] = {}

    def get(self, peer_id: str, now: float) -> PeerStats:
        stats = self.peers.get(peer_id)
        if stats is None:
            stats = self.peers[peer_id] = PeerStats(last_seen=now)
        stats.last_seen = max(stats.last_seen, now)
        return stats

    def succeeded(self, peer_id: str, now: float, throughput_sample: float) -> PeerStats:
        """A finished task: fold its throughput into the EMA and reset the ban count (a ban
        already running is served out)."""
        stats = self.get(peer_id, now)
        alpha = self.config.ema_alpha
        previous = stats.throughput
        stats.throughput = (
            throughput_sample
            if previous is None
            else (1 - alpha) * previous + alpha * throughput_sample
        )
        stats.tasks_done += 1
        stats.ban_strikes = 0
        return stats

    def failed(self, peer_id: str, now: float) -> PeerStats:
        """Ban the peer for ban_s * 2**(strikes-1), at most max_ban_s."""
        stats = self.get(peer_id, now)
        stats.tasks_failed += 1
        stats.ban_strikes += 1
        ban_s = min(
            self.config.ban_s * 2.0 ** min(stats.ban_strikes - 1, 60), self.config.max_ban_s
        )
        stats.banned_until = max(stats.banned_until, now + ban_s)
        return stats

    def usable(self, candidates: Sequence[str], now: float) -> list[str]:
        """The unbanned candidates, or, if all are banned, the one whose ban ends first
        (earliest in `candidates` on a tie): never empty for a non-empty list."""
        open_peers = [p for p in candidates if self.get(p, now).banned_until <= now]
        if open_peers:
            return open_peers
        return [min(candidates, key=lambda p: self.peers[p].banned_until)]

    def forget_stale(self, now: float) -> None:
        """Drop peers unseen for forget_after_s whose ban (if any) is over."""
        horizon = now - self.config.forget_after_s
        for peer_id in [
            p for p, s in self.peers.items() if s.last_seen < horizon and s.banned_until <= now
        ]:
            del self.peers[peer_id]

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        return {
            peer_id: {
                "throughput": s.throughput,
                "busy_until": s.busy_until,
                "busy_for_s": max(0.0, s.busy_until - now),
                "banned_until": s.banned_until,
                "banned_for_s": max(0.0, s.banned_until - now),
                "ban_strikes": s.ban_strikes,
                "tasks_done": s.tasks_done,
                "tasks_failed": s.tasks_failed,
                "seen_ago_s": max(0.0, now - s.last_seen),
            }
            for peer_id, s in sorted(self.peers.items())
        }


class Assignments:
    """(stage, microbatch) -> peer, the most recent `capacity` entries."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._peer_by_key: OrderedDict[tuple[int, int], str] = OrderedDict()

    def get(self, stage: int, microbatch: int) -> str | None:
        return self._peer_by_key.get((stage, microbatch))

    def remember(self, stage: int, microbatch: int, peer_id: str) -> None:
        self._peer_by_key[(stage, microbatch)] = peer_id
        self._peer_by_key.move_to_end((stage, microbatch))
        while len(self._peer_by_key) > self.capacity:
            self._peer_by_key.popitem(last=False)
