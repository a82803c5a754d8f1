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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

Tensors = dict[str, torch.Tensor]


class ContributionError(ValueError):
    """A contribution that cannot be used: wrong names, shapes, codec, or non-finite values."""


@dataclass(frozen=True)
class OuterConfig:
    """Settings every peer of a run must share (compared when a peer joins)."""

    name: str = "diloco"
    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True
    codec: str = "int8"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"--outer-lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--outer-momentum must be in [0, 1), got {self.momentum}")

    def to_dict(self) -> dict:
        return asdict(self)


def weights_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names and float32 bytes in name order: equal iff the weights are bit-equal."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0")
        digest.update(tensors[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class OuterOptimizer(ABC):
    """One outer algorithm (DiLoCo, ...): contribution → publish/gather → apply."""

    def __init__(self, outer_weights: Mapping[str, torch.Tensor], config: OuterConfig) -> None:
        self.config = config
        self.params: Tensors = {n: t.detach().to("cpu", torch.float32).clone() for n, t in outer_weights.items()}
        self.shapes = {n: tuple(t.shape) for n, t in self.params.items()}

    @abstractmethod
    def contribution(self, local_weights: Mapping[str, torch.Tensor]) -> dict[str, bytes]:
        """Encode this replica's pseudo-gradient θ − θ_local for publication."""

    @abstractmethod
    def decode_contribution(self, payload: Mapping[str, bytes]) -> Tensors:
        """Decode and validate a peer's contribution; raise ContributionError if unusable."""

    @abstractmethod
    def apply(self, contributions: Sequence[Tensors]) -> None:
        """Aggregate the round's decoded contributions and step the outer weights."""

    @abstractmethod
    def state_tensors(self) -> Tensors:
        """Outer weights and optimizer state, flat, for checkpoints and joiners."""

    @abstractmethod
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors`; raise ValueError on missing or mis-shaped entries."""

    def weights_hash(self) -> str:
        return weights_hash(self.params)

    def _check_names(self, names: Sequence[str] | set[str], what: str) -> None:
        missing, extra = set(self.params) - set(names), set(names) - set(self.params)
        if missing or extra:
            raise ContributionError(f"{what}: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
