"""Hugging Face Llama `config.json` ↔ shoal `ModelConfig`, and `--model` specs that name
either a preset or such a file. The weights side is train/hf.py (which re-exports these).

What shoal cannot reproduce is refused rather than approximated: rope scaling, biases,
activations other than SiLU, and model types other than Llama. Mistral is accepted when its
`sliding_window` is null: it is then the Llama architecture under another name (exports are
always written as Llama)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shoal.train.model import PRESETS, ModelConfig

CONFIG_FILE = "config.json"

_LLAMA_DEFAULTS = {  # LlamaConfig's defaults, for keys a config.json may leave out
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


# ---- configuration ------------------------------------------------------------------


def _rope_theta(config: Mapping[str, Any]) -> float:
    """rope_theta from either spelling: transformers < 5 writes `rope_theta` and
    `rope_scaling` (null for plain rotary), 5.x writes `rope_parameters`. Anything but the
    default (unscaled) rotary would give other logits, so it is refused."""
    theta = config.get("rope_theta", _LLAMA_DEFAULTS["rope_theta"])
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise ValueError(f"{key} {rope!r} is not an object")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"{key} {rope!r}: scaled rotary ({kind}) is not supported, only plain rotary"
            )
        theta = rope.get("rope_theta", theta)
    return float(theta)


def model_config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """A shoal ModelConfig from a Llama `config.json` (as a dict). Raises ValueError naming
    the first setting shoal's model cannot reproduce."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type == "mistral":
        if config.get("sliding_window") is not None:
            raise ValueError("mistral with a sliding_window is not supported (set it to null)")
    elif model_type != "llama" and (model_type or "LlamaForCausalLM" not in architectures):
        # model_type decides; architectures only when model_type is absent
        raise ValueError(
            f"model_type {model_type!r} (architectures {architectures}) is not supported: "
            "only Llama (LlamaForCausalLM) checkpoints, or Mistral without sliding window"
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise ValueError(f"{key}=true is not supported: shoal's model has no biases")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported: shoal's MLP is SwiGLU (silu)")
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    head_dim = config.get("head_dim")
    if head_dim is not None and heads * int(head_dim) != hidden:
        raise ValueError(
            f"head_dim {head_dim} != hidden_size / num_attention_heads ({hidden}/{heads}): "
            "shoal's heads split d_model evenly"
        )
    kv_heads = config.get("num_key_value_heads")
    defaults = {**_LLAMA_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    return ModelConfig(
        vocab_size=int(config["vocab_size"]),
        d_model=hidden,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=heads if kv_heads is None else int(kv_heads),
        d_ff=int(config["intermediate_size"]),
        max_seq_len=int(defaults["max_position_embeddings"]),
        rope_theta=_rope_theta(config),
        norm_eps=float(defaults["rms_norm_eps"]),
        tie_embeddings=bool(defaults["tie_word_embeddings"]),
    )


def hf_config_from_model(
    config: ModelConfig, eos_id: int | None = None, bos_id: int | None = None
) -> dict[str, Any]:
    """A LlamaForCausalLM `config.json` for `config` (fp32 weights). Written in the
    transformers 4.x spelling (`rope_theta`, `rope_scaling: null`), which 5.x still reads."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def load_model_config(spec: str) -> tuple[str, ModelConfig]:
    """(name, config) for a `--model` value: a preset name, or a path to a Hugging Face
    `config.json` (or a folder holding one; a JSON file of shoal's own `to_dict()` form is
    read too). The name is the preset's, the file's stem, or the folder's name when the
    file is just `config.json`."""
    if spec in PRESETS:
        return spec, PRESETS[spec]
    path = Path(spec)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"--model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
            f"config.json file or a folder holding one"
        )
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"model config {path} is not a JSON object")
    try:
        config = ModelConfig.from_dict(obj) if "d_model" in obj else model_config_from_hf(obj)
    except (TypeError, ValueError) as exc:  # TypeError: a shoal dict lacking a field
        raise ValueError(f"model config {path}: {exc}") from exc
    name = path.parent.resolve().name if path.name == CONFIG_FILE else path.stem
    return name, config
