"""Configuration: what a run shares (RunConfig, compared on join) and what one peer chooses.

Validated once at start-up; error messages name the CLI flag to change.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

from shoal.optim.inner import InnerConfig
from shoal.optim.outer import OuterConfig
from shoal.peer.errors import ConfigMismatch
from shoal.pipeline.skippipe import SkipPipeConfig
from shoal.pipeline.worker import RESCALE_MODES


@dataclass(frozen=True)
class RunConfig:
    """Everything that must be equal on every peer of one run."""

    model_preset: str
    model: dict[str, Any]  # ModelConfig.to_dict()
    inner: InnerConfig
    outer: OuterConfig
    inner_steps: int
    seed: int = 0
    stages: int = 0  # pipeline stages S (0: full replicas only); stage peers hold slices

    def __post_init__(self) -> None:
        if self.stages == 1 or self.stages < 0:
            raise ValueError(f"--stages must be 0 (no pipeline) or >= 2, got {self.stages}")
        if self.stages and self.outer.name not in ("diloco", "sparseloco"):
            raise ValueError(f"--stages needs --outer diloco or sparseloco (the outer rounds average stage slices), got {self.outer.name}")
        if self.inner_steps < 1:
            raise ValueError(f"--inner-steps must be >= 1, got {self.inner_steps}")
        between_syncs = self.inner_steps // self.outer.fragments
        if between_syncs < 1:
            raise ValueError(f"--fragments {self.outer.fragments} exceeds --inner-steps {self.inner_steps}: some rounds would have no steps")
        if self.outer.overlap >= between_syncs:
            raise ValueError(f"--overlap {self.outer.overlap} must be less than the {between_syncs} inner steps between syncs (H/P)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> RunConfig:
        try:
            return cls(
                model_preset=str(obj["model_preset"]),
                model=dict(obj["model"]),
                inner=InnerConfig(**obj["inner"]),
                outer=OuterConfig(**obj["outer"]),
                inner_steps=int(obj["inner_steps"]),
                seed=int(obj.get("seed", 0)),
                stages=int(obj.get("stages", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigMismatch(f"unreadable run config: {exc}") from None

    def check_same(self, other: RunConfig) -> None:
        """Raise ConfigMismatch naming every differing setting."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        diffs = [f"{k}: this peer {mine.get(k)!r}, swarm {theirs.get(k)!r}" for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k)]
        if diffs:
            raise ConfigMismatch("run config differs from the swarm's; refusing to join. " + "; ".join(diffs))


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


@dataclass(frozen=True)
class ProtocolConfig:
    """Timeouts and limits of the peer protocol, in one place."""

    heartbeat_interval_s: float = 1.0
    gossip_fanout: int = 3
    suspect_after_s: float = 3.0
    dead_after_s: float = 6.0
    gather_timeout_s: float | None = None  # None: derived from the measured inner-phase time
    min_gather_timeout_s: float = 10.0
    agree_timeout_s: float = 5.0
    partner_timeout_s: float = 10.0  # NoLoCo: the longest a peer waits for its partner
    request_timeout_s: float = 30.0
    max_request_bytes: int = 8 * 2**20
    max_response_bytes: int = 2 * 2**30
    state_chunk_bytes: int = 4 * 2**20
    max_clock_skew_s: float = 300.0
    rounds_kept: int = 3

    def __post_init__(self) -> None:
        if not self.partner_timeout_s > 0:
            raise ValueError(f"--partner-timeout must be positive, got {self.partner_timeout_s}")

    def gather_deadline_s(self, inner_seconds: float) -> float:
        """How long to wait for others after publishing: as long as our own inner phase took
        (slower peers get that much slack), never less than `min_gather_timeout_s`."""
        if self.gather_timeout_s is not None:
            return self.gather_timeout_s
        return max(self.min_gather_timeout_s, inner_seconds)


@dataclass(frozen=True)
class PeerConfig:
    """One peer process's settings (CLI flags)."""

    run: RunConfig
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    advertise: str | None = None  # URL others reach us at; derived from listen when None
    bootstrap: str | None = None
    swarm_key: str | None = None
    swarm_id: str | None = None  # first peer only; joiners adopt the swarm's
    peer_id: str = field(default_factory=lambda: "peer-" + secrets.token_hex(4))
    role: str = "replica"  # "replica" (the whole model) or "stage" (one pipeline stage)
    stage: int | None = None  # --role stage: which one (None: the least served, chosen on join)
    standby: bool = False  # --role stage: wait, serving nothing, to take over a stage that lost every peer
    activation: str = "none"  # --role stage: the pipeline replica's activation codec
    microbatch_size: int = 4  # stage 0: sequences per microbatch
    in_flight: int = 4  # stage 0: microbatches in the pipeline at once
    router: str = "swarm"  # stage 0: how a hop picks among a stage's peers (random, swarm)
    skip_ratio: float = 0.0  # stage 0: SkipPipe paths skipping this share of the stages (0: every stage)
    skip_swaps: int = 0  # stage 0: SkipPipe: most pairs of adjacent stages a path may run swapped
    skip_keep: tuple[int, ...] = (1,)  # stage 0: SkipPipe: block stages every path visits
    skip_rescale: str = "sqrt"  # stage 0: SkipPipe: residual scale of skipped-by-some stages (none, sqrt, inverse)
    out_of_order: float = 0.0  # stage 0: share of microbatches run with edge block stages swapped (CheckFree+)
    eval_stages: tuple[int, ...] | None = None  # stage 0: also evaluate through only these block stages
    emulate_forward_ms: float = 0.0  # benchmarks: a stage's training forward takes at least this (backward 2x)
    device: str = "auto"
    data_path: str | None = None
    num_shards: int = 16
    eval_batches: int = 8
    eval_every: int = 1  # evaluate after every N-th outer round (and the last)
    checkpoint_dir: str | None = None
    resume: bool = False
    max_rounds: int | None = None
    min_peers: int = 1  # wait until this many peers (us included) are alive before training
    linger_s: float = 60.0  # after the last round, serve until others finish theirs, at most this
    torch_threads: int | None = None
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port < 65536:
            raise ValueError(f"--listen port must be in 0..65535, got {self.listen_port}")
        if self.bootstrap is not None and not self.bootstrap.startswith(("http://", "https://")):
            raise ValueError(f"--bootstrap must be a URL like http://host:port, got {self.bootstrap!r}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.max_rounds}")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.min_peers < 1:
            raise ValueError(f"--min-peers must be >= 1, got {self.min_peers}")
        if self.role not in ("replica", "stage"):
            raise ValueError(f"--role must be replica or stage, got {self.role!r}")
        if self.role == "stage" and not self.run.stages:
            raise ValueError("--role stage needs a pipelined run: --stages S (S >= 2) on every peer")
        if self.standby and (self.role != "stage" or self.stage is not None):
            raise ValueError("--standby is for --role stage without --stage: the stage is the one that gets lost")
        if self.stage is not None and not 0 <= self.stage < max(self.run.stages, 1):
            raise ValueError(f"--stage must be in 0..{self.run.stages - 1}, got {self.stage}")
        if self.microbatch_size < 1 or self.in_flight < 1:
            raise ValueError("--microbatch-size and --in-flight must be >= 1")
        if not 0.0 <= self.emulate_forward_ms <= 60_000:
            raise ValueError(f"--emulate-forward-ms must be in [0, 60000], got {self.emulate_forward_ms}")
        if self.skip_swaps < 0:
            raise ValueError(f"--skip-swaps must be >= 0, got {self.skip_swaps}")
        if self.skip_rescale not in RESCALE_MODES:
            raise ValueError(f"--skip-rescale must be one of {', '.join(RESCALE_MODES)}, got {self.skip_rescale!r}")
        if not 0.0 <= self.skip_ratio < 1.0:
            raise ValueError(f"--skip-ratio must be in [0, 1), got {self.skip_ratio}")
        if self.skip_ratio and (len(set(self.skip_keep)) < len(self.skip_keep) or not all(1 <= s < self.run.stages for s in self.skip_keep)):
            raise ValueError(f"--skip-keep must list distinct block stages in 1..{self.run.stages - 1}, got {list(self.skip_keep)}")
        if self.skip_ratio and self.run.stages:
            visits = SkipPipeConfig(num_stages=self.run.stages, skip_ratio=self.skip_ratio).visits_per_path
            if len(self.skip_keep) > visits - 1:
                raise ValueError(f"--skip-keep keeps {len(self.skip_keep)} stages, but with --skip-ratio {self.skip_ratio} a path visits only {visits - 1} block stages")
        if not 0.0 <= self.out_of_order <= 1.0:
            raise ValueError(f"--out-of-order must be in [0, 1], got {self.out_of_order}")
        if self.eval_stages is not None and (not self.eval_stages or len(set(self.eval_stages)) < len(self.eval_stages)
                                             or not all(1 <= s < self.run.stages for s in self.eval_stages)):
            raise ValueError(f"--eval-stages must list distinct block stages in 1..{self.run.stages - 1}, got {list(self.eval_stages)}")
        if not 0 < len(self.peer_id) <= 128:
            raise ValueError("--peer-id must be 1..128 characters")
