"""What one peer trains on and how: its data and its schedule. Unlike the run, these are
this peer's own choices, never compared across the swarm."""

from __future__ import annotations

from dataclasses import dataclass, fields

from shoal.peer.options import flag_name, setting


@dataclass(frozen=True)
class DataConfig:
    """What this peer trains and evaluates on."""

    path: str | None = setting(
        None,
        "text file, folder or glob of UTF-8 text (.jsonl or .parquet: its text field), or a "
        "folder of `shoal tokenize` shards; default: this Python's standard library sources",
        kind=str,
        flag="--data",
        metavar="PATH",
    )
    num_shards: int = setting(
        16, "the corpus is cut into this many shards; a peer trains on the one its id picks"
    )
    eval_batches: int = setting(8, "held-out batches per evaluation")
    eval_every: int = setting(
        1, "evaluate on the held-out split after every N-th round and the last"
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "path" and getattr(self, f.name) < 1:
                raise ValueError(f"{flag_name(f)} must be >= 1, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class ScheduleConfig:
    """Where and how long this peer trains, and what it keeps."""

    device: str = setting("auto", "auto|cpu|cuda|cuda:N (auto: cuda when present)")
    torch_threads: int | None = setting(None, "torch CPU threads", kind=int, flag="--threads")
    max_rounds: int | None = setting(
        None,
        "stop after this many outer rounds (default: train until stopped)",
        kind=int,
        flag="--rounds",
    )
    min_peers: int = setting(
        1,
        "wait until this many peers (this one included) are alive before training "
        "(at most --min-peers-timeout)",
    )
    checkpoint_dir: str | None = setting(
        None, "write the outer state here after every round", kind=str, metavar="DIR"
    )
    resume: bool = setting(False, "continue from the latest checkpoint in --checkpoint-dir")
    nproc: int = setting(
        1,
        "ranks of this peer, one per device (cuda: GPUs 0..N-1; cpu: gloo processes); "
        "the run's --batch-size is split between them",
    )
    shard: str = setting(
        "auto",
        "with --nproc > 1: none (DDP), fsdp (FSDP2), or auto: fsdp when weights, gradients "
        "and AdamW would fill more than half of one GPU",
        choices=("auto", "none", "fsdp"),
    )
    compile: bool = setting(False, "torch.compile the model for inner steps (GPU peers)")
    checkpoint_activations: bool = setting(
        False,
        "recompute each block's activations in the backward pass: less memory, ~30% "
        "more compute (GPU peers with large models)",
    )
    compute_nice: int = setting(
        5,
        "CPU niceness of the training and byte-work threads above the event "
        "loop's, so that on a busy machine the loop answers first (0: the same)",
    )

    def __post_init__(self) -> None:
        if self.resume and not self.checkpoint_dir:
            raise ValueError("--resume needs --checkpoint-dir")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.max_rounds}")
        if self.min_peers < 1:
            raise ValueError(f"--min-peers must be >= 1, got {self.min_peers}")
        if not 0 <= self.compute_nice <= 19:
            raise ValueError(f"--compute-nice must be in 0..19, got {self.compute_nice}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.torch_threads}")
        if self.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {self.nproc}")
