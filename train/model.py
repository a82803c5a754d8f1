"""The default model: a small LLaMA-style decoder (over bytes by default), in one readable file.

    tokens ─► embed ─► [block × n_layers] ─► RMSNorm ─► head ─► logits
    block:  h = h + attn(RMSNorm(h))   (causal, rotary positions, optional grouped-query)
            h = h + mlp(RMSNorm(h))    (SwiGLU)

No biases anywhere. By default the output head reuses the input embedding matrix (tied
weights); `tie_embeddings=False` gives it its own `lm_head.weight`, as Hugging Face Llama
checkpoints have (train/hf.py converts between the two layouts).

The model is split into three separable parts so a pipeline stage can own a slice of it:
`embed_tokens` (stage 0), `forward_blocks(h, start, end)` (any run of blocks) and `head`
(final norm + output projection, stage 0 again in SkipPipe). `forward` just chains them.

Parameters and what travels between peers: the rotary cos/sin tables are non-persistent
buffers, and the tied head has no parameter of its own (it calls `F.linear` with
`embed.weight`; an untied head's `lm_head.weight` is registered last), so `state_dict()`
keys == `named_parameters()` names == `parameter_names()`, each weight exactly once.
That list is what peers hash, ship and average.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.train.model_parts import run_blocks, untied_head

# (embedding rows, token ids) → what the lookup writes to the residual stream
EmbeddingView = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# ---- configuration ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model's shape. Peers compare `to_dict()` when one joins a run: equal dicts mean
    the same architecture, so the same parameter names and shapes."""

    vocab_size: int = 256  # bytes
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # hidden width of the SwiGLU MLP
    max_seq_len: int  # length of the rotary tables; longer inputs are refused
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    # grouped-query attention: heads of keys/values, each shared by n_heads / n_kv_heads
    # query heads. None (the default, and what older peers' dicts imply) means n_heads;
    # it is stored resolved, so the two spellings of one architecture compare equal.
    n_kv_heads: int | None = None
    # False: the output head has its own matrix (`lm_head.weight`), as in Llama checkpoints
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        names = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")
        for name in (*names, "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads "
                "of even width (rotary embeddings rotate pairs of dimensions)"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}):"
                " each key/value head serves an equal group of query heads"
            )

    @property
    def kv_heads(self) -> int:
        """n_kv_heads as an int (always set after construction; this spares callers the
        Optional that the constructor's signature needs)."""
        assert self.n_kv_heads is not None
        return self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_params(self) -> int:
        """Unique trainable parameters (a tied head counts once), computed without
        building the model, so the 125M presets can be sized for free."""
        d, kv = self.d_model, self.kv_heads * self.head_dim
        # q + k + v, out, gate/up/down, 2 norms
        per_block = d * (d + 2 * kv) + d * d + 3 * d * self.d_ff + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * per_block + d  # + final norm

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (plain ints/floats), compared between peers."""
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**obj)


PRESETS: dict[str, ModelConfig] = {
    # unit tests: a training step takes milliseconds
    "tiny": ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=96, max_seq_len=64),
    # pipeline tests: tiny, with enough blocks for 4 stages
    "tiny-deep": ModelConfig(d_model=32, n_layers=4, n_heads=2, d_ff=96, max_seq_len=64),
    # the CPU demo (`shoal demo`): tuned with scripts/tune_small.py, see train/recipe.py
    "small": ModelConfig(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_seq_len=256),
    # pipeline benchmarks on a CPU: small's width, enough blocks for 6 stages
    # (scripts/bench_skippipe.py)
    "small-deep": ModelConfig(d_model=128, n_layers=10, n_heads=4, d_ff=384, max_seq_len=256),
    # ~25M: a laptop-class GPU or a patient CPU
    "base": ModelConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1408, max_seq_len=512),
    # ~125M (GPT-2 small shape): GPU peers
    "large": ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3456, max_seq_len=1024),
    # a real-tokenizer Llama: 124,668,672 parameters, for GPU peers that bring a tokenizer of
    # <= 32000 ids. Llama's own layout (untied head, 3 query heads per key/value head), so
    # `train/hf.py` exports it as a LlamaForCausalLM checkpoint as it is.
    "llama-125m": ModelConfig(
        vocab_size=32000,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=4,
        d_ff=2048,
        max_seq_len=2048,
        rope_theta=10000.0,
        tie_embeddings=False,
    ),
}


# ---- building blocks ----------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): LayerNorm without the mean or bias.
    Computed in float32 even under bf16 autocast, where the mean of squares would lose bits."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (RoFormer, Su et al. 2021), "rotate half" layout.

    Dimension pair (i, i + head_dim/2) of a query/key at position t is rotated by angle
    t * theta^(-2i/head_dim), so q·k depends only on the distance between positions.
    The cos/sin tables are derived data, not weights: non-persistent buffers, never in
    `state_dict()`, rebuilt by `reset()` (e.g. after `to_empty`)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        if self.cos.is_meta:
            return  # shapes only; reset() again once the module has real storage
        device = self.cos.device
        inv_freq = self.theta ** (
            -torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
        )
        angles = torch.outer(
            torch.arange(self.max_seq_len, device=device, dtype=torch.float64), inv_freq
        )
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by the per-position angles in cos/sin
    (seq, head_dim/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Causal attention with n_kv_heads key/value heads shared by groups of query heads
    (grouped-query attention, Ainslie et al. 2023; plain multi-head when they are equal).

    One fused `qkv` matmul whose output rows are [q heads | k heads | v heads]: with
    n_kv_heads == n_heads that is the 3·d_model layout the model always had, so existing
    runs keep their names, shapes and numbers; train/hf.py splits it into Llama's q/k/v."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.head_dim,
        )
        qkv_rows = (config.n_heads + 2 * config.kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_rows, bias=False)  # one matmul for q, k, v
        self.proj = nn.Linear(
            config.d_model, config.d_model, bias=False
        )  # residual output projection

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # (batch, heads, seq, head_dim) views: for n_kv_heads == n_heads these have exactly
        # the strides the former view(…, 3, heads, head_dim).permute gave
        q, k, v = (
            part.view(batch, seq, -1, self.head_dim).transpose(1, 2)
            for part in self.qkv(x).split((q_width, kv_width, kv_width), dim=-1)
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            # query head j reads key/value head j // group (Llama's grouping); repeating is
            # portable to every torch >= 2.1, SDPA's enable_gqa needs 2.5
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True
        )  # (batch, heads, seq, head_dim)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, d_model))


class SwiGLU(nn.Module):
    """MLP with a SiLU-gated hidden layer (Shazeer 2020), as in LLaMA:
    down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)  # residual output projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), cos, sin)
        return h + self.mlp(self.mlp_norm(h))


# ---- the model ----------------------------------------------------------------------


class Transformer(nn.Module):
    """Decoder-only model. `forward(idx, targets)` → (logits, mean cross-entropy in nats).

    Set `checkpoint_activations = True` to recompute each block's activations in the
    backward pass instead of keeping them (training mode only; results are unchanged)."""

    checkpoint_activations: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        # tied: no lm_head module, `head` projects with embed.weight, so the matrix exists once
        self.lm_head = untied_head(config)  # registered last: after norm.weight
        self.embedding_view: EmbeddingView | None = None

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2/nanoGPT init, drawn from `generator` in parameter-name order (so the result
        depends only on the seed): every matrix ~ N(0, 0.02²); the two residual output
        projections of each block are scaled by 1/sqrt(2·n_layers) so the residual stream's
        variance does not grow with depth; norm gains = 1. With small tied embeddings the
        initial logits are near zero and the loss starts near ln(vocab_size)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
                param.normal_(0.0, residual_std, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        self.rotary.reset()

    # The three separable parts (pipeline stages slice between them).

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """(batch, seq) byte ids → (batch, seq, d_model) residual stream: the embedding rows,
        or what `embedding_view` makes of them (pipeline/subspace.py confines the stream so)."""
        if idx.size(-1) > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {idx.size(-1)} exceeds max_seq_len {self.config.max_seq_len}"
            )
        rows = self.embed(idx)
        return rows if self.embedding_view is None else self.embedding_view(rows, idx)

    def forward_blocks(
        self, h: torch.Tensor, start: int = 0, end: int | None = None
    ) -> torch.Tensor:
        """Run blocks[start:end] on the residual stream h."""
        cos, sin = self.rotary(h.size(1))
        checkpointed = self.checkpoint_activations and self.training
        return run_blocks(self.blocks[start:end], h, cos, sin, checkpointed)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, then project onto the output matrix (`lm_head.weight`, or the embedding
        matrix when tied): logits over the vocabulary. EdgeStage borrows this method."""
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(h), weight)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.head(self.forward_blocks(self.embed_tokens(idx)))
        if targets is None:
            return logits, None
        # float32 loss even under bf16 autocast: log-softmax over the vocabulary is cheap
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def parameter_names(model: nn.Module) -> list[str]:
    """Canonical ordered list of unique parameter names: the order peers hash, ship and
    average weights in. For `Transformer` this is
    `embed.weight` (also the output head), then per block i
    `blocks.{i}.attn_norm.weight, blocks.{i}.attn.qkv.weight, blocks.{i}.attn.proj.weight,
    blocks.{i}.mlp_norm.weight, blocks.{i}.mlp.gate.weight, blocks.{i}.mlp.up.weight,
    blocks.{i}.mlp.down.weight`, then `norm.weight`, then (untied models only)
    `lm_head.weight`. `named_parameters()` already drops
    repeated tensors (a tied weight appears under its first name only), and equals
    `state_dict()`'s keys because all buffers are non-persistent."""
    return [name for name, _ in model.named_parameters()]


def build_model(
    preset_or_config: str | ModelConfig, seed: int, device: str | torch.device = "cpu"
) -> Transformer:
    """Build a model with initial weights that depend only on (config, seed): every peer of
    a run builds bit-identical weights on the CPU, touching no global RNG state.

    The modules are created on the meta device (no default init wasted), given storage,
    then filled by `init_weights` from a private generator. Pass device="meta" for a
    shape-only model (e.g. to count or list parameters of the large preset for free)."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(
                f"unknown model preset {preset_or_config!r}; choose from {sorted(PRESETS)}"
            )
        config = PRESETS[preset_or_config]
    else:
        config = preset_or_config
    with torch.device("meta"):
        model = Transformer(config)
    if torch.device(device).type == "meta":
        return model
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    return model.to(device)
