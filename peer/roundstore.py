"""What a peer holds for its recent rounds and serves to others: its contribution (or,
with reduce-scatter, its pseudo-gradient and the means of the shards it owns), the set it
published and its weights hash, by round; waiters are woken when anything changes
(`peer.rounds` describes the exchange, `peer.reduce` the shards)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from shoal.peer.errors import ProtocolError


class RoundStore:
    """What this peer holds for recent rounds and serves to others (event-loop only)."""

    def __init__(self, rounds_kept: int = 3) -> None:
        self.rounds_kept = rounds_kept
        self.contributions: dict[int, dict[str, Any]] = {}
        self.sets: dict[int, list[str]] = {}
        self.hashes: dict[int, str] = {}
        self.deltas: dict[int, Any] = {}  # reduce-scatter: our pseudo-gradient (`peer.reduce`)
        self.reduced: dict[int, tuple[str, dict[int, Any]]] = {}  # round -> (layout, shards)
        self._changed = asyncio.Event()

    def _bump(self, round_id: int) -> None:
        tables = (self.contributions, self.sets, self.hashes, self.deltas, self.reduced)
        for table in tables:
            for old in [r for r in table if r <= round_id - self.rounds_kept]:
                del table[old]
        self._changed.set()
        self._changed = asyncio.Event()

    def put_contribution(self, round_id: int, peer_id: str, answer: Any) -> None:
        """`answer`: what `/round/contribution` returns for it (a prepared body)."""
        self.contributions.setdefault(round_id, {})[peer_id] = answer
        self._bump(round_id)

    def put_set(self, round_id: int, peer_ids: list[str]) -> None:
        self.sets[round_id] = peer_ids
        self._bump(round_id)

    def put_delta(self, round_id: int, delta: Any) -> None:
        """Our round-r pseudo-gradient; round r − 1's stays for a slow peer's fallback, older
        ones go (a model-sized float32 vector each)."""
        self.deltas = {r: d for r, d in self.deltas.items() if r >= round_id - 1}
        self.deltas[round_id] = delta
        self._bump(round_id)

    def put_layout(self, round_id: int, tag: str) -> None:
        """The layout (`peer.reduce.layout_tag`) of the shards we reduce in round r."""
        self.reduced[round_id] = (tag, {})
        self._bump(round_id)

    def put_reduced(self, round_id: int, tag: str, index: int, answer: Any) -> None:
        held = self.reduced.get(round_id)
        if held is not None and held[0] == tag:
            held[1][index] = answer
            self._bump(round_id)

    def put_hash(self, round_id: int, weights_hash: str) -> None:
        self.hashes[round_id] = weights_hash
        self._bump(round_id)

    async def wait_for(self, lookup: Callable[[], Any], wait_s: float) -> Any:
        """Return `lookup()` once it is not None, or None after `wait_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        while (value := lookup()) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return None
        return value


def check_round_request(payload: dict[str, Any]) -> tuple[int, float]:
    """Validate the round and wait of a round request (server side)."""
    round_id, wait_s = payload.get("round"), payload.get("wait_s", 0.0)
    if not isinstance(round_id, int) or isinstance(round_id, bool) or round_id < 0:
        raise ProtocolError("round must be a non-negative integer")
    if not isinstance(wait_s, (int, float)) or isinstance(wait_s, bool) or not 0 <= wait_s <= 60:
        raise ProtocolError("wait_s must be a number in [0, 60]")
    return round_id, float(wait_s)
