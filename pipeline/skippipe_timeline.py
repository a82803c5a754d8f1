"""SkipPipe's time model: each peer's timeline of tasks and the hop time between two peers.

Time model: forward takes `forward_s`, backward `backward_s` (default backward_factor x
forward), the loss `loss_s` on the stage-0 peer; a hop between two peers takes
link_delay_s(a, b) + transfer_s. Links are not a shared resource. Tasks go into the earliest
idle gap of the peer's timeline, so later microbatches fill the bubbles of earlier ones.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence

from shoal.pipeline.skippipe_config import LinkDelays, PeerSpec


class PeerTimeline:
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


def link_function(
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
