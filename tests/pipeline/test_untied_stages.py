"""Pipeline stages of an untied, grouped-query model: `lm_head.weight` lives on stage 0 and
the stages together compute what the whole model does."""

import torch

from shoal.pipeline.stages import StagePlan, build_stage, stage_shapes
from shoal.train import ModelConfig, build_model, parameter_names

CONFIG = ModelConfig(
    vocab_size=300,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    d_ff=64,
    max_seq_len=32,
    tie_embeddings=False,
)


def test_lm_head_belongs_to_stage_zero():
    plan = StagePlan(3, CONFIG.n_layers)
    names = parameter_names(build_model(CONFIG, 0, device="meta"))
    slices = plan.slices(names)
    assert slices[0] == ["embed.weight", "norm.weight", "lm_head.weight"]
    assert sum(map(len, slices)) == len(names)
    assert list(stage_shapes(CONFIG, plan, 0)) == slices[0]


def test_stages_chain_to_the_whole_models_loss_and_head_gradient():
    plan = StagePlan(3, CONFIG.n_layers)
    full = build_model(CONFIG, 5)
    stages = [build_stage(CONFIG, plan, s, seed=5) for s in range(3)]
    assert torch.equal(stages[0].lm_head.weight, full.lm_head.weight)
    stages[2].checkpoint_activations = True  # recomputing in backward changes nothing
    idx = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = idx[:, :-1], idx[:, 1:]
    h = stages[0].embed_tokens(x)
    for stage in stages[1:]:
        h = stage(h)
    loss = stages[0].loss(h, y)
    loss.backward()
    _, want = full(x, y)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stages[0].lm_head.weight.grad, full.lm_head.weight.grad)
    torch.testing.assert_close(
        stages[2].blocks["2"].attn.qkv.weight.grad, full.blocks[2].attn.qkv.weight.grad
    )
