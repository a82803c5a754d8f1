import math

import pytest
import torch

from shoal.train import (
    PRESETS,
    RECIPES,
    ModelConfig,
    Transformer,
    autocast_context,
    build_model,
    evaluate,
    parameter_names,
    resolve_device,
)
from shoal.train.model import RMSNorm, RotaryEmbedding, apply_rotary


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    return build_model("tiny", seed=0)


def test_output_shapes_and_loss(tiny):
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = tiny(idx)
    assert logits.shape == (3, 17, 256) and loss is None
    _, loss = tiny(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)


def test_parts_compose_to_forward(tiny):
    idx = torch.randint(0, 256, (2, 9))
    h = tiny.embed_tokens(idx)
    h = tiny.forward_blocks(tiny.forward_blocks(h, 0, 1), 1, None)  # two "stages"
    torch.testing.assert_close(tiny.head(h), tiny(idx)[0])


def test_causal(tiny):
    idx = torch.randint(0, 256, (1, 20))
    changed = idx.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 256
    before, after = tiny(idx)[0], tiny(changed)[0]
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_too_long_sequence_is_refused(tiny):
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny(torch.zeros(1, tiny.config.max_seq_len + 1, dtype=torch.long))


def test_tied_weights_stored_once(tiny):
    names = parameter_names(tiny)
    assert names == list(tiny.state_dict()) == [n for n, _ in tiny.named_parameters()]
    assert (
        len(names) == len(set(names)) and names[0] == "embed.weight" and names[-1] == "norm.weight"
    )
    assert not any("head" in n or "rotary" in n for n in names)
    assert sum(p.numel() for p in tiny.parameters()) == tiny.config.num_params
    # the head really is the embedding: a gradient through the logits reaches embed.weight
    tiny.zero_grad()
    h = torch.randn(1, 1, tiny.config.d_model)
    tiny.head(h).sum().backward()
    assert tiny.embed.weight.grad is not None and tiny.embed.weight.grad.abs().sum() > 0
    tiny.zero_grad()


def test_same_seed_same_weights_different_seed_different():
    a, b, c = build_model("tiny", seed=7), build_model("tiny", seed=7), build_model("tiny", seed=8)
    for name in parameter_names(a):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("tiny", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_init_std_and_residual_scaling():
    model = build_model(
        ModelConfig(d_model=64, n_layers=8, n_heads=4, d_ff=256, max_seq_len=16), seed=0
    )
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert model.blocks[0].mlp.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)
    assert torch.all(model.norm.weight == 1)


def test_initial_loss_near_uniform():
    model = build_model("small", seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (4, 64), generator=g), torch.randint(0, 256, (4, 64), generator=g)
    _, loss = model(x, y)
    assert abs(loss.item() - math.log(256)) < 0.15


def test_tiny_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("tiny", seed=0)
    x = torch.randint(0, 256, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(x, y)[1].item()
    for _ in range(60):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_rmsnorm_unit_rms_and_scale_invariant():
    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(5, 16) * 7 + 1
    out = norm(x)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(norm(3 * x), out, rtol=1e-4, atol=1e-5)


def test_rotary_preserves_norm_and_depends_on_relative_position():
    rotary = RotaryEmbedding(head_dim=8, max_seq_len=32, theta=10000.0)
    cos, sin = rotary(32)
    q, k = torch.randn(8), torch.randn(8)
    seq = torch.stack([q] * 32).view(1, 1, 32, 8)
    rq = apply_rotary(seq, cos, sin)[0, 0]
    rk = apply_rotary(torch.stack([k] * 32).view(1, 1, 32, 8), cos, sin)[0, 0]
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(32))
    torch.testing.assert_close(rq[0], q)  # position 0: no rotation
    # <R_m q, R_n k> depends only on m - n
    assert rq[5] @ rk[2] == pytest.approx((rq[13] @ rk[10]).item(), abs=1e-4)
    assert abs((rq[5] @ rk[2]) - (rq[5] @ rk[4])) > 1e-4


def test_rotary_tables_are_not_state():
    model = build_model("tiny", seed=0)
    assert "rotary.cos" not in model.state_dict()
    assert {n for n, _ in model.named_buffers()} == {"rotary.cos", "rotary.sin"}
    assert torch.isfinite(model.rotary.cos).all() and model.rotary.cos[0].eq(1).all()


def test_config_round_trip_and_validation():
    for config in PRESETS.values():
        assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=30, n_layers=1, n_heads=4, d_ff=8, max_seq_len=8)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "bias": True})
    with pytest.raises(ValueError, match="preset"):
        build_model("huge", seed=0)


def test_presets_sizes_and_recipes():
    assert PRESETS["tiny"].num_params < 100_000
    assert 300_000 < PRESETS["small"].num_params < 3_000_000
    assert 20e6 < PRESETS["base"].num_params < 30e6
    assert 110e6 < PRESETS["large"].num_params < 140e6
    large = build_model("large", seed=0, device="meta")  # shapes only: no memory, no time
    assert sum(p.numel() for p in large.parameters()) == PRESETS["large"].num_params
    assert set(RECIPES) == set(PRESETS)
    for name, recipe in RECIPES.items():
        assert recipe.seq_len <= PRESETS[name].max_seq_len


def test_small_preset_builds_and_steps():
    model = build_model("small", seed=0)
    assert sum(p.numel() for p in model.parameters()) == PRESETS["small"].num_params
    recipe = RECIPES["small"]
    x = torch.randint(0, 256, (2, recipe.seq_len))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_evaluate_restores_mode_and_matches_forward(tiny):
    batches = [(torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))) for _ in range(3)]
    tiny.train()
    value = evaluate(tiny, batches, torch.device("cpu"))
    assert tiny.training
    expected = sum(tiny(x, y)[1].item() for x, y in batches) / 3
    assert value == pytest.approx(expected, rel=1e-5)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu0", "cuda:x"):
        with pytest.raises(ValueError):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda:1")
    with autocast_context(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
