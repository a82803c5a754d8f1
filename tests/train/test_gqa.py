"""Grouped-query attention, the untied head and activation checkpointing (train/model.py),
and that none of them moves the existing presets by a bit."""

import dataclasses
import hashlib

import pytest
import torch
import torch.nn.functional as F

from shoal.train import PRESETS, RECIPES, ModelConfig, build_model, parameter_names
from shoal.train.model import apply_rotary

GQA = ModelConfig(
    vocab_size=300,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=160,
    max_seq_len=64,
    tie_embeddings=False,
)


def weights_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(param.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_tiny_initial_weights_are_those_recorded_before_gqa():
    # computed from the code before n_kv_heads / tie_embeddings existed: names, shapes and
    # every bit of the seed-0 weights (the recorded benchmarks depend on them)
    assert weights_sha256(build_model("tiny", 0)) == (
        "982b0858cf13c8036a91ae3037ed3c40c672303ad2e12133b8d2dfd95dd56611"
    )
    assert weights_sha256(build_model("small", 0)) == (
        "9c3678b12465af6545da4398daddcc10cbbd4a13a1bdb33d4d4bb7caf9a3c2ba"
    )


@pytest.mark.parametrize("preset", ["tiny", "tiny-deep", "small", "small-deep", "base", "large"])
def test_existing_presets_keep_names_and_shapes(preset):
    config = PRESETS[preset]
    assert config.n_kv_heads == config.n_heads and config.tie_embeddings
    d, f = config.d_model, config.d_ff
    expected = [("embed.weight", (256, d))]
    for i in range(config.n_layers):
        b = f"blocks.{i}."
        expected += [
            (b + "attn_norm.weight", (d,)),
            (b + "attn.qkv.weight", (3 * d, d)),
            (b + "attn.proj.weight", (d, d)),
            (b + "mlp_norm.weight", (d,)),
            (b + "mlp.gate.weight", (f, d)),
            (b + "mlp.up.weight", (f, d)),
            (b + "mlp.down.weight", (d, f)),
        ]
    expected.append(("norm.weight", (d,)))
    model = build_model(preset, 0, device="meta")
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == expected


def test_full_head_attention_computes_exactly_what_the_former_layout_did():
    """With n_kv_heads == n_heads the q/k/v split must be the old view/permute bit for bit
    (same values and strides into SDPA), so recorded runs reproduce."""
    model = build_model("tiny", 0)
    attn, x = (
        model.blocks[0].attn,
        torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3)),
    )
    cos, sin = model.rotary(16)
    q, k, v = attn.qkv(x).view(2, 16, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    former = attn.proj(out.transpose(1, 2).reshape(2, 16, 32))
    assert torch.equal(attn(x, cos, sin), former)


def test_gqa_shapes_param_count_and_validation():
    model = build_model(GQA, 0)
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.shape == ((4 + 2 * 2) * 16, 64)
    assert sum(p.numel() for p in model.parameters()) == GQA.num_params
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        dataclasses.replace(GQA, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_kv_heads must be >= 1"):
        dataclasses.replace(GQA, n_kv_heads=0)


def test_gqa_equals_full_attention_with_each_kv_head_repeated_for_its_group():
    """Query head j reads key/value head j // (n_heads / n_kv_heads), as in Llama: the GQA
    model equals a full-head model whose k/v rows repeat each kv head for its group."""
    gqa = build_model(GQA, 0)
    full = build_model(dataclasses.replace(GQA, n_kv_heads=4), 1)
    weights = dict(gqa.named_parameters())
    with torch.no_grad():
        for name, param in full.named_parameters():
            if name.endswith("attn.qkv.weight"):
                q, k, v = weights[name].split((64, 32, 32))
                k, v = (
                    t.view(2, 16, 64).repeat_interleave(2, dim=0).reshape(64, 64) for t in (k, v)
                )
                param.copy_(torch.cat((q, k, v)))
            else:
                param.copy_(weights[name])
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gqa(idx)[0], full(idx)[0], rtol=1e-5, atol=1e-5)


def test_gqa_is_causal():
    model = build_model(GQA, 0)
    idx = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 300
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_untied_head_is_its_own_parameter_last_in_order():
    model = build_model(GQA, 0)
    names = parameter_names(model)
    assert names[-2:] == ["norm.weight", "lm_head.weight"]
    assert list(model.state_dict()) == names
    head = model.lm_head.weight
    assert head.shape == (300, 64) and abs(head.std().item() - 0.02) < 0.002
    # drawn after every block in one generator pass: the block weights are those of the
    # same config with a tied head (whose parameters come in the same order, minus the head)
    tied = build_model(dataclasses.replace(GQA, tie_embeddings=True), 0)
    for name, param in tied.named_parameters():
        assert torch.equal(param, model.get_parameter(name))
    assert GQA.num_params == tied.config.num_params + 300 * 64
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert model(torch.zeros(1, 4, dtype=torch.long))[0].abs().max() == 0  # head uses it


def test_older_dicts_without_the_new_keys_load_as_before():
    old = {k: v for k, v in PRESETS["tiny"].to_dict().items()}
    assert old.pop("n_kv_heads") == 2 and old.pop("tie_embeddings") is True
    assert ModelConfig.from_dict(old) == PRESETS["tiny"]
    assert ModelConfig.from_dict(GQA.to_dict()) == GQA
    # None and n_heads spell the same architecture, and compare equal
    assert dataclasses.replace(GQA, n_kv_heads=None) == dataclasses.replace(GQA, n_kv_heads=4)


def test_llama_125m_preset():
    config = PRESETS["llama-125m"]
    assert config.num_params == 124_668_672  # the number in the preset's comment
    model = build_model("llama-125m", 0, device="meta")
    assert sum(p.numel() for p in model.parameters()) == config.num_params
    assert parameter_names(model)[-1] == "lm_head.weight"
    assert RECIPES["llama-125m"].seq_len <= config.max_seq_len


@pytest.mark.parametrize("config", [PRESETS["tiny"], GQA], ids=["tiny", "gqa-untied"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(config):
    idx = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    plain, ckpt = build_model(config, 0), build_model(config, 0)
    ckpt.checkpoint_activations = True
    calls = []
    # a pre-hook: recomputation stops once it has what backward needs, before the block ends
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    losses = []
    for model in (plain, ckpt):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        losses.append(loss)
    assert len(calls) == 2  # the block ran again in backward: checkpointing was on
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
    ckpt.eval()  # eval mode never checkpoints
    calls.clear()
    with torch.no_grad():
        ckpt(idx)
    assert len(calls) == 1
