"""Hugging Face Llama interop (train/hf.py, train/hf_config.py): configs and weights both
ways, what is refused, and, against `transformers` itself, equal logits."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from shoal.train import PRESETS, ModelConfig, build_model, parameter_names
from shoal.train.hf import (
    build_model_from,
    export_hf,
    from_hf_state,
    hf_config_from_model,
    load_hf_weights,
    load_model_config,
    model_config_from_hf,
    to_hf_state,
)

HF_GQA = {  # a tiny untied GQA Llama, as a config.json holds it
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
GQA = model_config_from_hf(HF_GQA)
TIED = dataclasses.replace(GQA, n_kv_heads=4, tie_embeddings=True, rope_theta=500.0)


def ids(config: ModelConfig, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(seed)
    )


def shoal_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


def test_config_from_hf_reads_every_field_with_llama_defaults():
    assert GQA == ModelConfig(
        vocab_size=300,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=160,
        max_seq_len=64,
        rope_theta=10000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
    )
    sparse = {k: HF_GQA[k] for k in ("model_type", "vocab_size", "hidden_size")}
    sparse |= {"intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = model_config_from_hf(sparse)
    assert (config.n_kv_heads, config.rope_theta, config.norm_eps) == (4, 10000.0, 1e-6)
    assert (config.max_seq_len, config.tie_embeddings) == (2048, False)  # HF Llama's defaults
    # transformers 5 spells plain rotary as rope_parameters
    v5 = {**HF_GQA, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    del v5["rope_theta"], v5["rope_scaling"]
    assert model_config_from_hf(v5).rope_theta == 5e5
    no_type = {k: v for k, v in HF_GQA.items() if k != "model_type"}
    assert model_config_from_hf(no_type) == GQA  # architectures decides then
    mistral = {**HF_GQA, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    assert model_config_from_hf({**mistral, "sliding_window": None}) == GQA


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "gpt2"),
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window"),
        ({"head_dim": 32}, "head_dim"),
        ({"num_key_value_heads": 3}, "multiple of n_kv_heads"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_config_from_hf_refuses_what_shoal_cannot_reproduce(change, match):
    config = {k: v for k, v in {**HF_GQA, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        model_config_from_hf(config)


@pytest.mark.parametrize("config", [GQA, TIED, PRESETS["tiny"], PRESETS["llama-125m"]])
def test_hf_config_round_trip(config):
    hf = hf_config_from_model(config, eos_id=2, bos_id=1)
    assert json.loads(json.dumps(hf)) == hf
    assert (hf["architectures"], hf["torch_dtype"], hf["rope_scaling"]) == (
        ["LlamaForCausalLM"],
        "float32",
        None,
    )
    assert (hf["eos_token_id"], hf["bos_token_id"], hf["head_dim"]) == (2, 1, config.head_dim)
    assert model_config_from_hf(hf) == config


def test_load_model_config_takes_presets_files_and_folders(tmp_path):
    assert load_model_config("tiny") == ("tiny", PRESETS["tiny"])
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_GQA))
    assert load_model_config(str(folder)) == ("my-llama", GQA)
    assert load_model_config(str(folder / "config.json")) == ("my-llama", GQA)
    (tmp_path / "small-llama.json").write_text(json.dumps(HF_GQA))
    assert load_model_config(str(tmp_path / "small-llama.json")) == ("small-llama", GQA)
    (tmp_path / "shoal.json").write_text(json.dumps(TIED.to_dict()))  # shoal's own form
    assert load_model_config(str(tmp_path / "shoal.json")) == ("shoal", TIED)
    with pytest.raises(ValueError, match="llama-125m.*tiny"):
        load_model_config("tiniest")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read"):
        load_model_config(str(tmp_path / "bad.json"))
    (tmp_path / "partial.json").write_text(json.dumps({"d_model": 64}))
    with pytest.raises(ValueError, match="partial.json"):
        load_model_config(str(tmp_path / "partial.json"))
    (tmp_path / "gpt2.json").write_text(json.dumps({**HF_GQA, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2.json.*not supported"):
        load_model_config(str(tmp_path / "gpt2.json"))


@pytest.mark.parametrize("config", [GQA, TIED], ids=["gqa-untied", "tied"])
def test_state_round_trip(config):
    weights = dict(build_model(config, 3).named_parameters())
    hf = to_hf_state(weights, config)
    assert hf["model.layers.1.self_attn.k_proj.weight"].shape == (config.kv_heads * 16, 64)
    assert ("lm_head.weight" in hf) is not config.tie_embeddings
    back = from_hf_state(hf, config)
    assert list(back) == list(weights)  # parameter_names order
    assert all(torch.equal(back[n], weights[n]) for n in weights)


def test_from_hf_state_refuses_mismatched_checkpoints():
    hf = to_hf_state(dict(build_model(GQA, 0).named_parameters()), GQA)
    with pytest.raises(ValueError, match="missing.*o_proj"):
        from_hf_state({k: v for k, v in hf.items() if "1.self_attn.o_proj" not in k}, GQA)
    with pytest.raises(ValueError, match="unexpected.*bias"):
        from_hf_state({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, GQA)
    with pytest.raises(ValueError, match="wrong shape.*k_proj"):
        from_hf_state({**hf, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}, GQA)
    # a tied config accepts a head equal to the embedding, and refuses another one
    tied = to_hf_state(dict(build_model(TIED, 0).named_parameters()), TIED)
    embed = tied["model.embed_tokens.weight"]
    assert torch.equal(
        from_hf_state({**tied, "lm_head.weight": embed}, TIED)["embed.weight"], embed
    )
    with pytest.raises(ValueError, match="differs"):
        from_hf_state({**tied, "lm_head.weight": embed + 1}, TIED)
    # older transformers saved the rotary inv_freq buffer: derived data, skipped
    stale = {**hf, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    assert list(from_hf_state(stale, GQA)) == parameter_names(build_model(GQA, 0, "meta"))


def test_export_and_load_round_trip_sharded_too(tmp_path):
    model = build_model(GQA, 4)
    weights = dict(model.named_parameters())
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"added_tokens": [{"id": 2, "content": "</s>"}]}))
    out = export_hf(weights, GQA, tmp_path / "out", str(tokenizer), eos_id=2, bos_id=1)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    config, loaded = load_hf_weights(out)
    assert config == GQA and all(torch.equal(loaded[n], w) for n, w in weights.items())
    torch.testing.assert_close(
        shoal_logits(build_model_from(loaded, config), ids(GQA)), shoal_logits(model, ids(GQA))
    )
    # the same tensors split over two shards with an index, as large checkpoints come
    state = load_file(str(out / "model.safetensors"))
    shards = tmp_path / "sharded"
    shards.mkdir()
    (shards / "config.json").write_text((out / "config.json").read_text())
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(shards / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, from_shards = load_hf_weights(shards)
    assert all(torch.equal(from_shards[n], w) for n, w in weights.items())
    (shards / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="neither"):
        load_hf_weights(shards)
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_weights(tmp_path)


# ---- against transformers itself ----------------------------------------------------


def fp32(transformers) -> dict[str, torch.dtype]:
    """from_pretrained's dtype argument: `torch_dtype` before transformers 5, `dtype` since."""
    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


@pytest.mark.parametrize("config", [GQA, TIED], ids=["gqa-untied", "tied"])
def test_exported_model_gives_shoals_logits_in_transformers(config, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = build_model(config, 7)
    with torch.no_grad():  # norm gains away from 1, so a misplaced norm would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    export_hf(dict(model.named_parameters()), config, tmp_path, eos_id=None, bos_id=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, **fp32(transformers), attn_implementation="eager"
    ).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    idx = ids(config, 1)
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
    ours = shoal_logits(model, idx)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie", [False, True], ids=["gqa-untied", "tied"])
def test_transformers_checkpoint_gives_its_logits_in_shoal(tie, tmp_path):
    transformers = pytest.importorskip("transformers")
    settings = {k: v for k, v in HF_GQA.items() if k not in ("architectures", "model_type")}
    settings["tie_word_embeddings"] = tie
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**settings, attn_implementation="sdpa")
    ).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    config, weights = load_hf_weights(tmp_path)
    assert config == dataclasses.replace(GQA, tie_embeddings=tie)
    idx = ids(config, 2)
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
    ours = shoal_logits(build_model_from(weights, config), idx)
    assert (theirs - ours).abs().max().item() < 1e-4


def test_exported_tokenizer_loads_with_auto_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    weights = dict(build_model(GQA, 0).named_parameters())
    out = export_hf(weights, GQA, tmp_path / "out", str(tmp_path / "tokenizer.json"), 2, 1)
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    assert (loaded.eos_token, loaded.bos_token) == ("</s>", "<s>")
    assert loaded("a b a").input_ids == [3, 4, 3]
