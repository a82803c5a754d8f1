"""The outer-optimizer interface: what a replica sends after its inner steps, and how
what arrives from the swarm becomes the next outer weights.

An outer optimizer owns the outer (slow) weights θ and its own state, always as float32
tensors on the CPU: every peer must compute bit-identical outer weights from the same
contributions, whatever device its inner steps run on, so the outer step never runs on
an accelerator and never uses reductions whose order could differ between machines.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from shoal.compression import CodecError

Tensors = dict[str, torch.Tensor]


class ContributionError(ValueError):
    """A contribution that cannot be used: wrong names, shapes, codec, or non-finite values."""


@dataclass(frozen=True)
class OuterConfig:
    """Settings every peer of a run must share (compared when a peer joins)."""

    name: str = "diloco"
    lr: float = 0.7  # DiLoCo's outer lr; SparseLoCo's α
    momentum: float = 0.9  # DiLoCo's Nesterov momentum (SparseLoCo has none)
    nesterov: bool = True
    codec: str = "int8"
    error_decay: float = 0.95  # SparseLoCo's error-feedback β
    topk: int = 64  # SparseLoCo's values kept per 4096-element chunk
    fragments: int = 1  # Streaming DiLoCo's P
    overlap: int = 0  # Streaming DiLoCo's τ: inner steps the exchange overlaps
    mix: float = 0.5  # Streaming DiLoCo's α in θ_local ← α·θ_local + (1−α)·θ_outer
    exchange: str = "auto"  # auto: reduce-scatter where the codec is dense; gather: always
    shard_elements: int = 65536  # reduce-scatter: the fewest elements per shard

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--outer-lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--outer-momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.error_decay <= 1:
            raise ValueError(f"--error-decay must be in [0, 1], got {self.error_decay}")
        if not 1 <= self.topk <= 4096:
            raise ValueError(f"--topk must be in 1..4096, got {self.topk}")
        if self.fragments < 1:
            raise ValueError(f"--fragments must be >= 1, got {self.fragments}")
        if self.overlap < 0:
            raise ValueError(f"--overlap must be >= 0, got {self.overlap}")
        if not 0 <= self.mix < 1:
            raise ValueError(f"--mix must be in [0, 1), got {self.mix}")
        if self.shard_elements < 1:
            raise ValueError(f"--shard-elements must be >= 1, got {self.shard_elements}")
        if self.exchange not in ("auto", "gather"):
            raise ValueError(f"--exchange must be auto or gather, got {self.exchange!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def weights_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names and float32 bytes in name order: equal iff the weights are bit-equal."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(
            tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        )
    return digest.hexdigest()


class OuterOptimizer(ABC):
    """One outer algorithm (DiLoCo, ...): contribution → publish/gather → apply.

    The hooks below the abstract methods default to plain DiLoCo-style rounds: H inner
    steps, a round barrier, local weights replaced by the outer ones; NoLoCo and
    Streaming DiLoCo override them."""

    pairwise = False  # True: exchange with one partner per step instead of the whole round
    supports_slices = False  # True: peers holding different slices of the model can share a round

    def __init__(
        self,
        outer_weights: Mapping[str, torch.Tensor],
        config: OuterConfig,
        slices: Sequence[Sequence[str]] | None = None,
    ) -> None:
        """`outer_weights` are the tensors this peer holds: the whole model for a full
        replica, one stage's slice for a pipeline stage peer. `slices` partitions the
        whole model's names into the run's stage slices (None: one slice, the weights
        given); a contribution must carry every name of a slice or none of it."""
        self.config = config
        self.params: Tensors = {
            n: t.detach().to("cpu", torch.float32).clone() for n, t in outer_weights.items()
        }
        self.shapes = {n: tuple(t.shape) for n, t in self.params.items()}
        self.slices: list[list[str]] = (
            [list(s) for s in slices] if slices is not None else [list(self.params)]
        )
        self._slice_of = {name: index for index, names in enumerate(self.slices) for name in names}
        missing = set(self.params) - set(self._slice_of)
        if missing:
            raise ValueError(f"weights {sorted(missing)[:3]} belong to no slice of the model")
        if len(self.slices) > 1 and not self.supports_slices:
            raise ValueError(
                f"--outer {config.name} does not support pipeline stages (slices of the model); "
                "use diloco or sparseloco"
            )

    @abstractmethod
    def contribution(self, local_weights: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
        """Encode this replica's pseudo-gradient θ − θ_local for publication."""

    @abstractmethod
    def decode_contribution(self, payload: Mapping[str, bytes]) -> Any:
        """Decode and validate a peer's contribution into what `apply` takes (dense tensors
        for DiLoCo, indices and values for SparseLoCo); raise ContributionError if unusable."""

    @abstractmethod
    def apply(self, contributions: Sequence[Any]) -> None:
        """Aggregate the round's decoded contributions and step the outer weights."""

    @property
    def reducible(self) -> bool:
        """True if the round's average can be computed by reduce-scatter (`peer.reduce`):
        the pseudo-gradient is one dense flat vector (`flat_delta`), the same length on every
        peer, averaged elementwise and stepped with `apply_mean`."""
        return False

    def flat_delta(self, local_weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The pseudo-gradient θ − θ_local as one flat float32 vector (reducible only)."""
        raise NotImplementedError(f"{type(self).__name__} is not reducible")

    def apply_mean(self, mean: torch.Tensor | Sequence[torch.Tensor] | None) -> None:
        """Step the outer weights with the swarm's mean pseudo-gradient, flat like
        `flat_delta`, whole or as consecutive pieces (reducible only); None: nobody's, θ and
        the state stay as they are."""
        raise NotImplementedError(f"{type(self).__name__} is not reducible")

    @property
    def overlap_steps(self) -> int:
        """Inner steps of the next round that run while this round's exchange completes."""
        return 0

    def begin_round(self, round_id: int) -> None:  # noqa: B027 - a hook most optimizers leave empty
        """Called before `contribution` for round `round_id`."""

    def round_steps(self, round_id: int, inner_steps: int) -> int:
        """Inner steps before round `round_id`'s contribution (H by default)."""
        return inner_steps

    def merged_local(self, local_weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The local weights to continue from after `apply`, given the live ones (read only):
        the outer weights by default."""
        return self.params

    def state_groups(self) -> dict[str, Tensors]:
        """The shared state by prefix: outer weights, plus optimizer state (e.g. momentum).
        Local-only state (SparseLoCo's error buffer) is not part of it."""
        return {"outer/": self.params}

    def pin_memory(self) -> None:
        """Move every tensor this optimizer holds to pinned (page-locked) CPU memory, so that
        copies to and from a CUDA device run at full speed. Call before the first round:
        tensors are updated in place afterwards, so they stay pinned."""
        for value in vars(self).values():
            if isinstance(value, dict):
                for name, tensor in value.items():
                    if isinstance(tensor, torch.Tensor) and not tensor.is_pinned():
                        value[name] = tensor.pin_memory()

    def memory_bytes(self) -> int:
        """Bytes of the tensors this optimizer holds: outer weights, momentum, error buffers
        (each tensor once, in any dict of tensors among its attributes)."""
        held = {
            id(t): t.nbytes
            for value in vars(self).values()
            if isinstance(value, dict)
            for t in value.values()
            if isinstance(t, torch.Tensor)
        }
        return sum(held.values())

    def state_tensors(self) -> Tensors:
        """Outer weights and optimizer state, flat, for checkpoints and joiners."""
        return {
            prefix + n: t for prefix, group in self.state_groups().items() for n, t in group.items()
        }

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors`; checks every entry before changing any, and raises
        ValueError on a missing or mis-shaped one."""
        targets = self.state_tensors()
        for key, current in targets.items():
            source = tensors.get(key)
            if source is None or tuple(source.shape) != tuple(current.shape):
                raise ValueError(f"state tensor {key} missing or mis-shaped")
        for key, current in targets.items():
            current.copy_(tensors[key].to(torch.float32))

    def weights_hash(self) -> str:
        return weights_hash(self.params)

    def _decode_each(
        self, payload: Mapping[str, bytes], decode: Callable[[bytes, tuple[int, ...]], Any]
    ) -> dict[str, Any]:
        """Validate a contribution's names and decode each tensor's payload with `decode`
        (a codec method), turning codec errors into ContributionError. Only the tensors
        this peer holds are decoded: a stage peer skips the rest of a full replica's
        contribution, and gets nothing (an empty map) from another stage's."""
        if not isinstance(payload, Mapping):
            raise ContributionError("contribution must be a map of tensor name to payload")
        names = set(payload)
        if not names:
            raise ContributionError("contribution: holds no tensors")
        unknown = names - set(self._slice_of)
        if unknown:
            raise ContributionError(f"contribution: unexpected {sorted(map(str, unknown))[:3]}")
        for index in {self._slice_of[n] for n in names}:
            missing = set(self.slices[index]) - names
            if missing:
                raise ContributionError(
                    f"contribution: missing {sorted(missing)[:3]} "
                    f"(slice {index} must be sent whole)"
                )
        decoded = {}
        for name, shape in self.shapes.items():
            if name not in payload:
                continue
            blob = payload[name]
            if not isinstance(blob, bytes):
                raise ContributionError(f"{name}: payload must be bytes")
            try:
                decoded[name] = decode(blob, shape)
            except CodecError as exc:
                raise ContributionError(f"{name}: {exc}") from None
        return decoded

    def holders(self, contributions: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
        """The decoded tensors of `name` among contributions (maps by name), in order."""
        return [c[name] for c in contributions if name in c]

    def _check_names(self, names: Sequence[str] | set[str], what: str) -> None:
        missing, extra = set(self.params) - set(names), set(names) - set(self.params)
        if missing or extra:
            raise ContributionError(
                f"{what}: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
