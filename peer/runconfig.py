"""The run's definition: what every peer of a run shares and compares on `/join`.

`RunConfig` is the resolved definition that travels (its `to_dict` is the wire form,
`check_same` names every difference). `RunSettings`, `InnerSettings` and `OuterSettings`
are the run's settings as a user gives them (flags or `--config`; None means the preset's
recipe or the optimizer's default), which `resolve_run` turns into a `RunConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from shoal.optim.inner import InnerConfig
from shoal.optim.outer import OuterConfig
from shoal.peer.errors import ConfigMismatch
from shoal.peer.options import setting


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
            raise ValueError(
                "--stages needs --outer diloco or sparseloco (the outer rounds average stage "
                f"slices), got {self.outer.name}"
            )
        if self.inner_steps < 1:
            raise ValueError(f"--inner-steps must be >= 1, got {self.inner_steps}")
        between_syncs = self.inner_steps // self.outer.fragments
        if between_syncs < 1:
            raise ValueError(
                f"--fragments {self.outer.fragments} exceeds --inner-steps {self.inner_steps}: "
                "some rounds would have no steps"
            )
        if self.outer.overlap >= between_syncs:
            raise ValueError(
                f"--overlap {self.outer.overlap} must be less than the {between_syncs} inner "
                "steps between syncs (H/P)"
            )

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
        diffs = [
            f"{k}: this peer {mine.get(k)!r}, swarm {theirs.get(k)!r}"
            for k in sorted(mine.keys() | theirs.keys())
            if mine.get(k) != theirs.get(k)
        ]
        if diffs:
            raise ConfigMismatch(
                "run config differs from the swarm's; refusing to join. " + "; ".join(diffs)
            )


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


# ---- the run, as given (resolved into RunConfig) ------------------------------------------


def _presets() -> tuple[str, ...]:
    from shoal.train import PRESETS

    return tuple(sorted(PRESETS))


def _outers() -> tuple[str, ...]:
    from shoal.optim.registry import OUTER_OPTIMIZERS

    return tuple(sorted(OUTER_OPTIMIZERS))


def _codecs() -> tuple[str, ...]:
    from shoal.compression import CODECS

    return tuple(sorted(CODECS))


@dataclass(frozen=True)
class RunSettings:
    """The run's model and shape (must match across the swarm)."""

    model: str = setting("small", "model size preset", choices=_presets())
    inner_steps: int | None = setting(
        None, "H, inner steps per outer round (default: the preset's recipe)", kind=int
    )
    seed: int = setting(0, "initial-weights seed of the run")
    stages: int = setting(
        0, "pipeline stages S of the run's pipeline replicas (default 0: full replicas only)"
    )


@dataclass(frozen=True)
class InnerSettings:
    """The inner AdamW loop (must match across the swarm)."""

    inner_lr: float | None = setting(
        None, "AdamW learning rate (default: the preset's recipe)", kind=float
    )
    batch_size: int | None = setting(
        None, "sequences per inner step (default: the preset's recipe)", kind=int
    )
    seq_len: int | None = setting(
        None, "bytes per sequence (default: the preset's recipe)", kind=int
    )


@dataclass(frozen=True)
class OuterSettings:
    """The outer optimizer (must match across the swarm)."""

    outer: str = setting("diloco", "outer optimizer", choices=_outers())
    codec: str | None = setting(
        None,
        "pseudo-gradient codec (default: int8 for diloco and noloco, topk for "
        "sparseloco, q4 for streaming)",
        kind=str,
        choices=_codecs(),
    )
    outer_lr: float | None = setting(
        None,
        "outer learning rate (default: 0.7 for diloco and noloco's η, 1.0 for sparseloco)",
        kind=float,
    )
    outer_momentum: float | None = setting(
        None,
        "outer momentum (default: 0.9 Nesterov for diloco, 0.5 for noloco, 0 for sparseloco)",
        kind=float,
    )
    error_decay: float | None = setting(
        None, "sparseloco's error-feedback decay (default 0.95)", kind=float
    )
    topk: int | None = setting(
        None, "sparseloco's values kept per 4096-element chunk (default 64)", kind=int
    )
    fragments: int | None = setting(
        None, "streaming: P, parameter fragments synced in turn (default 4)", kind=int
    )
    overlap: int | None = setting(
        None, "streaming: τ, inner steps each exchange overlaps (default 5)", kind=int
    )
    mix: float | None = setting(
        None, "streaming: α in θ_local ← α·θ_local + (1−α)·θ_outer (default 0.5)", kind=float
    )


def resolve_run(run: RunSettings, inner: InnerSettings, outer: OuterSettings) -> RunConfig:
    """The RunConfig these settings define, defaults filled from the preset's recipe and the
    optimizer's registry entry."""
    from shoal.optim.registry import outer_config
    from shoal.train import PRESETS, RECIPES

    recipe = RECIPES[run.model]
    inner_config = InnerConfig(
        lr=inner.inner_lr or recipe.inner_lr,
        warmup_steps=recipe.warmup_steps,
        batch_size=inner.batch_size or recipe.batch_size,
        seq_len=inner.seq_len or recipe.seq_len,
    )
    outer_config_ = outer_config(
        outer.outer,
        codec=outer.codec,
        lr=outer.outer_lr,
        momentum=outer.outer_momentum,
        error_decay=outer.error_decay,
        topk=outer.topk,
        fragments=outer.fragments,
        overlap=outer.overlap,
        mix=outer.mix,
    )
    return RunConfig(
        model_preset=run.model,
        model=PRESETS[run.model].to_dict(),
        inner=inner_config,
        outer=outer_config_,
        inner_steps=run.inner_steps or recipe.inner_steps,
        seed=run.seed,
        stages=run.stages,
    )
