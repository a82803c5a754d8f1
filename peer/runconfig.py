"""The run's definition: what every peer of a run shares and compares on `/join`.

`RunConfig` is the resolved definition that travels (its `to_dict` is the wire form,
`check_same` names every difference). `RunSettings`, `InnerSettings` and `OuterSettings`
are the run's settings as a user gives them (flags or `--config`; None means the preset's
recipe or the optimizer's default), which `resolve_run` turns into a `RunConfig`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from shoal.optim.inner import InnerConfig
from shoal.optim.outer import OuterConfig
from shoal.peer.errors import ConfigMismatch
from shoal.peer.options import setting

if TYPE_CHECKING:
    from shoal.train import ModelConfig, Recipe

BYTES_TOKENIZER = "bytes"  # RunConfig.tokenizer of byte-level runs (no tokenizer file)


@dataclass(frozen=True)
class RunConfig:
    """Everything that must be equal on every peer of one run."""

    model_preset: str  # the model's name: a preset, or its config.json's folder or stem
    model: dict[str, Any]  # ModelConfig.to_dict()
    inner: InnerConfig
    outer: OuterConfig
    inner_steps: int
    seed: int = 0
    stages: int = 0  # pipeline stages S (0: full replicas only); stage peers hold slices
    tokenizer: str = BYTES_TOKENIZER  # or "sha256:<hex>" of the run's tokenizer.json
    init: str | None = None  # "sha256:<hex>" of --init-from's files; None: seeded weights

    def __post_init__(self) -> None:
        self.model_config()  # a ModelConfig's own checks, with its message
        for name, value in (("tokenizer", self.tokenizer), ("init", self.init)):
            if value not in (None, BYTES_TOKENIZER) and not _is_sha256_ref(value):
                raise ValueError(f"run config {name} must be 'sha256:<64 hex>', got {value!r}")
        if self.stages == 1 or self.stages < 0:
            raise ValueError(f"--stages must be 0 (no pipeline) or >= 2, got {self.stages}")
        if self.stages and self.outer.name not in ("diloco", "sparseloco"):
            raise ValueError(
                "--stages needs --outer diloco or sparseloco (the outer rounds average stage "
                f"slices), got {self.outer.name}"
            )
        if self.inner_steps < 1:
            raise ValueError(f"--inner-steps must be >= 1, got {self.inner_steps}")
        if self.stages and self.inner.grad_accum > 1:
            raise ValueError("--batch-tokens (gradient accumulation) needs full replicas")
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

    def model_config(self) -> ModelConfig:
        from shoal.train import ModelConfig

        return ModelConfig.from_dict(self.model)

    def sha256(self) -> str:
        """The run's hash: sha256 of its canonical JSON (sorted keys, no spaces)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> RunConfig:
        try:
            init = obj.get("init")
            return cls(
                model_preset=str(obj["model_preset"]),
                model=dict(obj["model"]),
                inner=InnerConfig(**obj["inner"]),
                outer=OuterConfig(**obj["outer"]),
                inner_steps=int(obj["inner_steps"]),
                seed=int(obj.get("seed", 0)),
                stages=int(obj.get("stages", 0)),
                tokenizer=str(obj.get("tokenizer", BYTES_TOKENIZER)),
                init=None if init is None else str(init),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigMismatch(f"unreadable run config: {exc}") from None

    def check_same(self, other: RunConfig) -> None:
        """Raise ConfigMismatch naming every differing setting."""
        mine, theirs = flatten(self.to_dict()), flatten(other.to_dict())
        diffs = [
            f"{k}: this peer {mine.get(k)!r}, swarm {theirs.get(k)!r}"
            for k in sorted(mine.keys() | theirs.keys())
            if mine.get(k) != theirs.get(k)
        ]
        if diffs:
            raise ConfigMismatch(
                "run config differs from the swarm's; refusing to join. " + "; ".join(diffs)
            )


def _is_sha256_ref(value: str) -> bool:
    digest = value.removeprefix("sha256:")
    return (
        value.startswith("sha256:")
        and len(digest) == 64
        and all(c in "0123456789abcdef" for c in digest)
    )


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested maps as one map of dotted keys ("inner.lr"); tuples as lists."""
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


# ---- the run, as given (resolved into RunConfig) ------------------------------------------


def _outers() -> tuple[str, ...]:
    from shoal.optim.registry import OUTER_OPTIMIZERS

    return tuple(sorted(OUTER_OPTIMIZERS))


def _codecs() -> tuple[str, ...]:
    from shoal.compression import CODECS

    return tuple(sorted(CODECS))


@dataclass(frozen=True)
class RunSettings:
    """The run's model and shape (must match across the swarm)."""

    model: str | None = setting(
        None,
        "a preset (tiny, small, base, large, llama-125m, ...) or a Hugging Face Llama "
        "config.json or its folder (default: small, or --init-from's config)",
        kind=str,
        metavar="PRESET|CONFIG",
    )
    tokenizer: str | None = setting(
        None,
        "a Hugging Face tokenizer.json (default: bytes, the byte-level vocabulary of 256)",
        kind=str,
        metavar="FILE",
    )
    init_from: str | None = setting(
        None,
        "start from this Hugging Face Llama checkpoint folder (config.json + "
        "model.safetensors): continued pretraining; its config is the model",
        kind=str,
        metavar="DIR",
    )
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
        None, "tokens per sequence (default: the preset's recipe)", kind=int
    )
    warmup_steps: int | None = setting(
        None, "linear learning-rate warmup over the run's first N inner steps", kind=int
    )
    batch_tokens: int | None = setting(
        None,
        "tokens per inner step: gradients of batch_tokens / (batch_size * seq_len) batches "
        "are accumulated into each step (default: one batch per step)",
        kind=int,
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
    exchange: str = setting(
        "auto",
        "how a round's pseudo-gradients are averaged: auto (reduce-scatter + all-gather where "
        "the codec is dense, the mean re-quantized with it; a gather of whole contributions "
        "for topk) or gather (always the gather)",
        choices=("auto", "gather"),
    )
    shard_elements: int | None = setting(
        None,
        "reduce-scatter: the fewest elements per shard, so a small model is cut into fewer "
        "shards than peers (default 65536, one int8 chunk)",
        kind=int,
    )


@dataclass(frozen=True)
class RunFiles:
    """This peer's own copies of the files the run names by hash (`RunConfig.tokenizer`,
    `RunConfig.init`): paths differ from machine to machine, so they never travel."""

    tokenizer: str | None = None  # tokenizer.json
    init_from: str | None = None  # a Hugging Face checkpoint folder


def resolve_run(run: RunSettings, inner: InnerSettings, outer: OuterSettings) -> RunConfig:
    """The RunConfig these settings define, defaults filled from the preset's recipe and the
    optimizer's registry entry; the tokenizer and --init-from files are read and hashed."""
    from shoal.optim.registry import outer_config
    from shoal.peer.runfiles import init_sha256
    from shoal.train.hf import load_model_config
    from shoal.train.tokenizer import load_tokenizer

    name, model = load_model_config(run.model or "small")
    init = None
    if run.init_from is not None:
        name, model = _init_model(run, name, model)
        init = f"sha256:{init_sha256(run.init_from)}"
    tokenizer = load_tokenizer(run.tokenizer)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(
            f"--tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
            f"{model.vocab_size}"
        )
    recipe = recipe_for(name, model)
    batch_size = inner.batch_size or recipe.batch_size
    seq_len = inner.seq_len or recipe.seq_len
    inner_config = InnerConfig(
        lr=inner.inner_lr or recipe.inner_lr,
        warmup_steps=recipe.warmup_steps if inner.warmup_steps is None else inner.warmup_steps,
        batch_size=batch_size,
        seq_len=seq_len,
        grad_accum=_grad_accum(inner.batch_tokens, batch_size * seq_len),
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
        exchange=outer.exchange,
        shard_elements=outer.shard_elements,
    )
    return RunConfig(
        model_preset=name,
        model=model.to_dict(),
        inner=inner_config,
        outer=outer_config_,
        inner_steps=run.inner_steps or recipe.inner_steps,
        seed=run.seed,
        stages=run.stages,
        tokenizer=tokenizer_ref(tokenizer),
        init=init,
    )


def _init_model(run: RunSettings, name: str, model: ModelConfig) -> tuple[str, ModelConfig]:
    """--init-from's model; --model, when given too, must describe the same one."""
    from shoal.train.hf import load_model_config

    init_name, init_model = load_model_config(run.init_from)
    if run.model is not None and init_model != model:
        raise ValueError(
            f"--model {run.model} differs from --init-from {run.init_from}'s config.json; "
            "leave --model out (the checkpoint's config is the model)"
        )
    return init_name, init_model


def tokenizer_ref(tokenizer: Any) -> str:
    """What RunConfig.tokenizer holds for a loaded tokenizer."""
    sha256 = getattr(tokenizer, "sha256", None)
    return BYTES_TOKENIZER if sha256 is None else f"sha256:{sha256}"


def recipe_for(name: str, model: ModelConfig) -> Recipe:
    """The preset's recipe; for a model from a config.json, a generic one for GPU peers
    (every field can be set by its flag)."""
    from shoal.train import RECIPES, Recipe

    if name in RECIPES:
        return RECIPES[name]
    return Recipe(
        batch_size=8,
        seq_len=min(1024, model.max_seq_len),
        inner_lr=6e-4,
        warmup_steps=100,
        inner_steps=100,
    )


def _grad_accum(batch_tokens: int | None, tokens_per_batch: int) -> int:
    if batch_tokens is None:
        return 1
    if batch_tokens < tokens_per_batch or batch_tokens % tokens_per_batch:
        raise ValueError(
            f"--batch-tokens {batch_tokens} must be a multiple of --batch-size x --seq-len = "
            f"{tokens_per_batch}"
        )
    return batch_tokens // tokens_per_batch
