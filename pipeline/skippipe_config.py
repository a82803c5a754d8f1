"""SkipPipe's inputs and outputs: the peers and knobs a plan is made from (`PeerSpec`,
`SkipPipeConfig`), the plan (`Schedule` of `Task`s) and `ScheduleInfeasible`.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Hop = tuple[int, str]  # (stage_index, peer_id)
LinkDelays = (
    Callable[[str, str], float] | Mapping[tuple[str, str], float] | Sequence[Sequence[float]]
)


class ScheduleInfeasible(ValueError):
    """No plan satisfies the constraints; `constraints` names the ones that ruled paths out
    ("coverage", "visit_cap", "visit_floor", "max_jump", "always_visit", "max_expansions"),
    `microbatch` the one that failed (None when detected before the search)."""

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
                "always_visit must list distinct block stages in "
                f"1..{self.num_stages - 1}, got {list(kept)}"
            )
        if len(kept) > self.visits_per_path - 1:
            raise ValueError(
                f"always_visit keeps {len(kept)} stages but paths visit only "
                f"{self.visits_per_path - 1} besides stage 0 (skip_ratio={self.skip_ratio})"
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


def validate_peers(peers: Sequence[PeerSpec], num_stages: int) -> dict[str, PeerSpec]:
    """The peers by id, or ValueError naming the peer and field that is out of range."""
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
