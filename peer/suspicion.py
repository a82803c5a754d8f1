"""SWIM's suspicion, per peer of the local table (Das, Gupta and Motivala, 2002): a peer is
alive until someone fails to reach it, then suspect for a window, then dead.

Liveness used to be a heartbeat counter that every peer had to see move every few seconds,
which costs every peer news of all N counters all the time. With suspicion, a live peer
costs nothing: only a failed probe starts news ("X is suspect at heartbeat h"), and X
refutes it by raising its heartbeat ("X is alive at h + 1"). So `heartbeat` no longer
beats: it counts refutations, and orders the three kinds of news about X:
- alive(h) clears a suspicion of a lower heartbeat;
- suspect(h) and dead(h) apply when h is at least the heartbeat known for X.

Each peer times a suspicion from when it heard of it: after `window_s` (dead_after_s −
suspect_after_s) unrefuted, the suspect is dead here. A dead peer is also one that we
`declare_dead` ourselves (a failed direct probe, a failed download). Direct contact with
a peer (it answered us, or wrote to us) clears our own suspicion of it at once; the
others' clears when its refutation reaches them.
"""

from __future__ import annotations

from collections.abc import Callable


class Suspicions:
    """peer id -> (local time the suspicion began, the heartbeat it names)."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self.window_s = window_s
        self.clock = clock
        self.since: dict[str, tuple[float, int]] = {}

    def status(self, peer_id: str) -> str:
        entry = self.since.get(peer_id)
        if entry is None:
            return "alive"
        return "dead" if self.clock() - entry[0] >= self.window_s else "suspect"

    def suspect(self, peer_id: str, heartbeat: int) -> bool:
        """Start suspecting `peer_id` at `heartbeat` (the caller checked it is not stale);
        True if that is news here (not already suspected at that heartbeat or later)."""
        entry = self.since.get(peer_id)
        if entry is not None and entry[1] >= heartbeat:
            return False
        began = self.clock() if entry is None else entry[0]
        self.since[peer_id] = (began, heartbeat)
        return True

    def dead(self, peer_id: str, heartbeat: int) -> bool:
        """Dead now; True if it was not dead here before."""
        was_dead = self.status(peer_id) == "dead"
        entry = self.since.get(peer_id)
        began = self.clock() - self.window_s
        if entry is not None:
            began = min(began, entry[0])
        self.since[peer_id] = (began, max(heartbeat, entry[1] if entry else heartbeat))
        return not was_dead

    def clear(self, peer_id: str, heartbeat: int | None = None) -> bool:
        """Drop the suspicion (of any heartbeat, or only of one below `heartbeat`); True if
        there was one to drop."""
        entry = self.since.get(peer_id)
        if entry is None or (heartbeat is not None and entry[1] >= heartbeat):
            return False
        del self.since[peer_id]
        return True

    def began(self, peer_id: str) -> float | None:
        entry = self.since.get(peer_id)
        return None if entry is None else entry[0]
