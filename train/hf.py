"""Hugging Face Llama checkpoints in and out, without importing `transformers`.

shoal's `Transformer` is the Llama architecture (pre-norm RMSNorm, rotary positions in the
"rotate half" layout, SwiGLU, no biases, optional grouped-query attention and untied head),
so a shoal model and a `LlamaForCausalLM` hold the same numbers under different names:

    shoal                              Hugging Face
    embed.weight                       model.embed_tokens.weight
    blocks.i.attn_norm.weight          model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv.weight           model.layers.i.self_attn.{q,k,v}_proj.weight (rows)
    blocks.i.attn.proj.weight          model.layers.i.self_attn.o_proj.weight
    blocks.i.mlp_norm.weight           model.layers.i.post_attention_layernorm.weight
    blocks.i.mlp.{gate,up,down}.weight model.layers.i.mlp.{gate,up,down}_proj.weight
    norm.weight                        model.norm.weight
    lm_head.weight (untied only)       lm_head.weight

Both rotate the pair (i, i + head_dim/2), so q/k rows need no permutation (the logits
tests in tests/train/test_hf.py hold this to 1e-4 against `transformers` itself).

The config side (and what is refused: rope scaling, biases, other activations, other
model types) is train/hf_config.py; its functions are re-exported here.

Files are read with `safetensors` (a core dependency); `transformers` is only needed to
use the exported folder, and by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from shoal.train.hf_config import (
    CONFIG_FILE,
    hf_config_from_model,
    load_model_config,
    model_config_from_hf,
)
from shoal.train.model import ModelConfig, Transformer, build_model

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

__all__ = [
    "build_model_from",
    "export_hf",
    "from_hf_state",
    "hf_config_from_model",
    "hf_shapes",
    "load_hf_weights",
    "load_model_config",
    "model_config_from_hf",
    "to_hf_state",
]


# ---- weights ------------------------------------------------------------------------


# a block's tensors in parameter order: (shoal name, HF name under model.layers.i.);
# the fused qkv (None) is split into / joined from q_proj, k_proj, v_proj rows
_BLOCK_NAMES: list[tuple[str, str | None]] = [
    ("attn_norm", "input_layernorm"),
    ("attn.qkv", None),
    ("attn.proj", "self_attn.o_proj"),
    ("mlp_norm", "post_attention_layernorm"),
    ("mlp.gate", "mlp.gate_proj"),
    ("mlp.up", "mlp.up_proj"),
    ("mlp.down", "mlp.down_proj"),
]


def _qkv_rows(config: ModelConfig) -> tuple[int, int, int]:
    kv = config.kv_heads * config.head_dim
    return config.n_heads * config.head_dim, kv, kv


def hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM checkpoint of `config` holds, with its shape
    (`lm_head.weight` only when untied: tied checkpoints may omit it)."""
    d, (q, k, v) = config.d_model, _qkv_rows(config)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (k, d),
            p + "self_attn.v_proj.weight": (v, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (config.d_ff, d),
            p + "mlp.up_proj.weight": (config.d_ff, d),
            p + "mlp.down_proj.weight": (d, config.d_ff),
        }
    shapes["model.norm.weight"] = (d,)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def to_hf_state(
    weights: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """shoal weights (named as `parameter_names`) → a LlamaForCausalLM state dict, fp32 and
    contiguous (safetensors refuses views). A tied model's head is left out, as
    `save_pretrained` does; `from_pretrained` ties it back to the embedding."""
    out = {"model.embed_tokens.weight": weights["embed.weight"]}
    for i in range(config.n_layers):
        for ours, theirs in _BLOCK_NAMES:
            tensor, hf = weights[f"blocks.{i}.{ours}.weight"], f"model.layers.{i}."
            if theirs is None:
                q, k, v = tensor.split(_qkv_rows(config), dim=0)
                for x, part in zip("qkv", (q, k, v), strict=True):
                    out[f"{hf}self_attn.{x}_proj.weight"] = part
            else:
                out[f"{hf}{theirs}.weight"] = tensor
    out["model.norm.weight"] = weights["norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = weights["lm_head.weight"]
    return {name: t.detach().to(torch.float32).contiguous() for name, t in out.items()}


def from_hf_state(hf: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict → shoal weights in `parameter_names` order, fp32.
    Refuses missing, unexpected or wrongly shaped tensors, and a tied config whose
    checkpoint carries an `lm_head.weight` unequal to the embedding. Saved rotary
    `inv_freq` buffers (older transformers wrote them) are derived data and skipped."""
    shapes = hf_shapes(config)
    present = {n for n in hf if not n.endswith("rotary_emb.inv_freq")}
    missing, extra = set(shapes) - present, present - set(shapes)
    if config.tie_embeddings and not missing and "lm_head.weight" in extra:
        extra.discard("lm_head.weight")
        if not torch.equal(hf["lm_head.weight"], hf["model.embed_tokens.weight"]):
            raise ValueError(
                "the config ties the head to the embedding, but the checkpoint's "
                "lm_head.weight differs from model.embed_tokens.weight"
            )
    if missing or extra:
        raise ValueError(
            f"checkpoint does not match the config: missing {_some(missing)}, "
            f"unexpected {_some(extra)}"
        )
    wrong = [
        f"{n}: {tuple(hf[n].shape)} (config wants {s})"
        for n, s in shapes.items()
        if tuple(hf[n].shape) != s
    ]
    if wrong:
        raise ValueError(f"checkpoint tensors of the wrong shape: {wrong[:8]}")

    def get(name: str) -> torch.Tensor:
        return hf[name].detach().to(torch.float32)

    out = {"embed.weight": get("model.embed_tokens.weight")}
    for i in range(config.n_layers):
        hf_block = f"model.layers.{i}."
        for ours, theirs in _BLOCK_NAMES:
            if theirs is None:
                parts = [get(f"{hf_block}self_attn.{x}_proj.weight") for x in "qkv"]
                out[f"blocks.{i}.{ours}.weight"] = torch.cat(parts, dim=0)
            else:
                out[f"blocks.{i}.{ours}.weight"] = get(f"{hf_block}{theirs}.weight")
    out["norm.weight"] = get("model.norm.weight")
    if not config.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    return out


def _some(names: set[str]) -> str:
    """A few of `names`, for an error message that stays readable."""
    listed = sorted(names)
    return f"{listed[:8]}{' …' if len(listed) > 8 else ''}"


def build_model_from(
    weights: Mapping[str, torch.Tensor],
    config: ModelConfig,
    device: str | torch.device = "cpu",
) -> Transformer:
    """A Transformer of `config` holding `weights` (every parameter, exact names and
    shapes; `load_state_dict(strict=True)` refuses anything else)."""
    model = build_model(config, seed=0, device="meta")
    model.to_empty(device="cpu")
    model.load_state_dict(dict(weights), strict=True)
    model.rotary.reset()
    return model.to(device)


# ---- files --------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder and rename it into place, so a
    crash never leaves a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _token_content(tokenizer_json: Path, token_id: int | None) -> str | None:
    """The text of special token `token_id` in a tokenizers `tokenizer.json`, if listed
    among its added tokens (where BOS/EOS markers live)."""
    if token_id is None:
        return None
    try:
        added = json.loads(tokenizer_json.read_text()).get("added_tokens") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return next((t.get("content") for t in added if t.get("id") == token_id), None)


def export_hf(
    weights: Mapping[str, torch.Tensor],
    config: ModelConfig,
    out_dir: str | os.PathLike[str],
    tokenizer_path: str | os.PathLike[str] | None = None,
    eos_id: int | None = None,
    bos_id: int | None = None,
) -> Path:
    """Write a folder `transformers.AutoModelForCausalLM.from_pretrained` loads: config.json,
    model.safetensors (fp32) and, given a tokenizer.json, a copy of it plus a minimal
    tokenizer_config.json so `AutoTokenizer` finds it. Each file is written atomically.
    Returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = to_hf_state(weights, config)
    _write_atomic(out / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(hf_config_from_model(config, eos_id, bos_id), indent=2) + "\n"
    _write_atomic(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    if tokenizer_path is not None:
        source = Path(tokenizer_path)
        _write_atomic(out / TOKENIZER_FILE, lambda tmp: shutil.copyfile(source, tmp))
        tok_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": config.max_seq_len,
        }
        for key, token_id in (("bos_token", bos_id), ("eos_token", eos_id)):
            content = _token_content(source, token_id)
            if content is not None:
                tok_config[key] = content
        tok_text = json.dumps(tok_config, indent=2) + "\n"
        _write_atomic(out / "tokenizer_config.json", lambda tmp: Path(tmp).write_text(tok_text))
    return out


def load_hf_weights(
    hf_dir: str | os.PathLike[str],
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, shoal weights in fp32) from a Hugging Face Llama folder: config.json plus
    model.safetensors, or shards listed in model.safetensors.index.json. PyTorch `.bin`
    checkpoints are refused (unpickling is unsafe; convert them to safetensors first)."""
    from safetensors.torch import load_file

    folder = Path(hf_dir)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{folder} holds no {CONFIG_FILE}")
    config = model_config_from_hf(json.loads(config_path.read_text()))
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        raise ValueError(f"{folder} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    hf: dict[str, torch.Tensor] = {}
    for file in files:
        hf.update(load_file(str(file)))
    return config, from_hf_state(hf, config)
