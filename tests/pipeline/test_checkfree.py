"""CheckFree / CheckFree+ stage recovery (pipeline/checkfree.py): the gradient-norm-weighted
average against hand computations, block-name mapping between stages of different sizes,
the edge-stage copy, fallbacks and validation, the lr scale, which stages are lost and
where to fetch from, and a rebuilt stage inside the tiny-deep model."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.optim.inner import InnerConfig
from shoal.pipeline.checkfree import (
    RECOVERY_LR_SCALE,
    lost_stages,
    rebuild_stage,
    recovered_inner_config,
    recovered_trainer,
    recovery_source,
)
from shoal.pipeline.stages import StagePlan
from shoal.train import build_model


def constant_blocks(
    plan: StagePlan, stage: int, shape: tuple[int, ...] = (2, 3)
) -> dict[str, torch.Tensor]:
    """Stage weights where every tensor of block k is filled with k (and `b` with −k)."""
    weights = {}
    for k in plan.blocks(stage):
        weights[f"blocks.{k}.w"] = torch.full(shape, float(k))
        weights[f"blocks.{k}.b"] = torch.full(shape[-1:], -float(k))
    return weights


def test_weighted_average_matches_hand_computation():
    plan = StagePlan(4, 3)  # stages 1..3 hold blocks [0], [1], [2]
    prev = {"blocks.0.w": torch.tensor([1.0, 2.0])}
    nxt = {"blocks.2.w": torch.tensor([4.0, 8.0])}
    rebuilt = rebuild_stage(plan, 2, prev, nxt, prev_grad_norm=1.0, next_grad_norm=3.0)
    # (a·W_{i+1} + b·W_{i−1}) / (a + b) with a = ‖g_{i+1}‖ = 3, b = ‖g_{i−1}‖ = 1
    assert set(rebuilt) == {"blocks.1.w"}
    assert torch.equal(rebuilt["blocks.1.w"], torch.tensor([(3 * 4 + 1) / 4, (3 * 8 + 2) / 4]))
    # swapping the norms swaps the pull: the neighbour with the larger norm dominates
    swapped = rebuild_stage(plan, 2, prev, nxt, prev_grad_norm=3.0, next_grad_norm=1.0)
    assert torch.equal(swapped["blocks.1.w"], torch.tensor([(4 + 3 * 1) / 4, (8 + 3 * 2) / 4]))


def test_uneven_block_counts_map_by_position_and_clamp():
    plan = StagePlan(5, 7)
    assert [list(plan.blocks(s)) for s in range(1, 5)] == [[0, 1], [2, 3], [4, 5], [6]]
    # stage 3 (blocks 4, 5) from stage 2 (2, 3) and stage 4 (6 only: clamped to its last block)
    rebuilt = rebuild_stage(plan, 3, constant_blocks(plan, 2), constant_blocks(plan, 4), 1.0, 1.0)
    assert set(rebuilt) == {"blocks.4.w", "blocks.4.b", "blocks.5.w", "blocks.5.b"}
    assert torch.equal(rebuilt["blocks.4.w"], torch.full((2, 3), (2 + 6) / 2))
    assert torch.equal(rebuilt["blocks.5.w"], torch.full((2, 3), (3 + 6) / 2))
    assert torch.equal(rebuilt["blocks.5.b"], torch.full((3,), -(3 + 6) / 2))
    # stage 2 (blocks 2, 3) from stage 1 (0, 1) and stage 3 (4, 5): position j ↔ position j
    rebuilt = rebuild_stage(plan, 2, constant_blocks(plan, 1), constant_blocks(plan, 3), 1.0, 3.0)
    assert torch.equal(rebuilt["blocks.2.w"], torch.full((2, 3), (3 * 4 + 0) / 4))
    assert torch.equal(rebuilt["blocks.3.w"], torch.full((2, 3), (3 * 5 + 1) / 4))


def test_edge_block_stage_copies_its_neighbour():
    plan = StagePlan(5, 7)
    source = constant_blocks(plan, 2)
    first = rebuild_stage(plan, 1, None, source)  # CheckFree+: stage 1's other side is stage 0
    assert set(first) == {"blocks.0.w", "blocks.0.b", "blocks.1.w", "blocks.1.b"}
    assert torch.equal(first["blocks.0.w"], source["blocks.2.w"])
    assert torch.equal(first["blocks.1.b"], source["blocks.3.b"])
    first["blocks.0.w"].add_(1.0)  # a fresh copy: the neighbour's tensors are untouched
    assert torch.equal(source["blocks.2.w"], torch.full((2, 3), 2.0))
    last = rebuild_stage(plan, 4, constant_blocks(plan, 3), None)
    assert set(last) == {"blocks.6.w", "blocks.6.b"}
    assert torch.equal(last["blocks.6.w"], torch.full((2, 3), 4.0))


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, None])
def test_unusable_norm_gives_equal_weights(bad):
    plan = StagePlan(4, 3)
    prev, nxt = {"blocks.0.w": torch.tensor([0.0])}, {"blocks.2.w": torch.tensor([4.0])}
    for prev_norm, next_norm in ((bad, 5.0), (5.0, bad), (bad, bad)):
        rebuilt = rebuild_stage(plan, 2, prev, nxt, prev_norm, next_norm)
        assert torch.equal(rebuilt["blocks.1.w"], torch.tensor([2.0]))


@pytest.mark.parametrize(
    "change",
    [
        lambda w: w.update({"blocks.2.w": torch.zeros(3, 2)}),  # shape
        lambda w: w.update({"blocks.2.w": torch.zeros(2, 3, dtype=torch.float64)}),  # dtype
        lambda w: w["blocks.2.w"].__setitem__((0, 0), math.nan),
        lambda w: w["blocks.3.b"].__setitem__(1, math.inf),
        lambda w: w.update({"blocks.4.w": torch.zeros(2, 3)}),  # another stage's block
        lambda w: w.update({"embed.weight": torch.zeros(2, 3)}),
        lambda w: w.pop("blocks.3.b"),  # an incomplete block
        lambda w: w.update({"blocks.2.extra": torch.zeros(1)}),  # a parameter the neighbour lacks
    ],
)
def test_bad_neighbour_weights_raise(change):
    plan = StagePlan(5, 7)
    nxt = constant_blocks(plan, 2)
    change(nxt)
    with pytest.raises(ValueError):
        rebuild_stage(plan, 1, None, nxt)
    with pytest.raises(ValueError):
        rebuild_stage(plan, 3, nxt, constant_blocks(plan, 4), 1.0, 1.0)


def test_neighbours_of_different_shapes_raise():
    plan = StagePlan(5, 7)
    with pytest.raises(ValueError, match="differ in shape"):
        rebuild_stage(plan, 3, constant_blocks(plan, 2, (3, 2)), constant_blocks(plan, 4), 1.0, 1.0)


def test_wrong_neighbours_raise():
    plan = StagePlan(5, 7)
    with pytest.raises(ValueError, match="stage 0"):
        rebuild_stage(plan, 0, None, constant_blocks(plan, 1))
    with pytest.raises(ValueError, match="needs the weights of stage 3"):
        rebuild_stage(plan, 2, constant_blocks(plan, 1), None, 1.0, 1.0)
    with pytest.raises(ValueError, match="stage 0 holds no blocks"):
        rebuild_stage(plan, 1, {}, constant_blocks(plan, 2))
    with pytest.raises(ValueError, match="stage 5 holds no blocks"):
        rebuild_stage(plan, 4, constant_blocks(plan, 3), {})
    with pytest.raises(ValueError, match="only block stage"):
        rebuild_stage(StagePlan(2, 3), 1, None, None)


def test_recovery_lr_scale_and_fresh_optimizer():
    config = InnerConfig(lr=4e-4, warmup_steps=100)
    recovered = recovered_inner_config(config)
    assert RECOVERY_LR_SCALE == 1.1
    assert recovered.lr == pytest.approx(4.4e-4)
    assert recovered == InnerConfig(lr=recovered.lr, warmup_steps=100)  # nothing else changed
    params = {"blocks.1.w": torch.nn.Parameter(torch.ones(3))}
    trainer = recovered_trainer(params, config, step_count=500)
    assert trainer.optimizer.state == {} and trainer.step_count == 500
    params["blocks.1.w"].grad = torch.ones(3)
    trainer.optimizer_step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(4.4e-4)  # past warmup, scaled


def test_lost_stages_and_recovery_source():
    plan = StagePlan(6, 5)  # block stages 1..5, one block each
    assert lost_stages(plan, [0, 1, 2, 3, 4, 5]) == []
    assert lost_stages(plan, [0, 0, 1, 3, 3, 5]) == [2, 4]
    assert lost_stages(plan, []) == [1, 2, 3, 4, 5]
    live = [0, 1, 3, 5]  # 2 and 4 lost, each with both neighbours live
    assert recovery_source(plan, 2, live) == ("average", (1, 3))
    assert recovery_source(plan, 4, live) == ("average", (3, 5))
    assert recovery_source(plan, 3, live) == ("copy", (3,))  # a replica survives
    assert recovery_source(plan, 1, [0, 2, 3]) == ("copy", (2,))  # CheckFree+
    assert recovery_source(plan, 5, [0, 4]) == ("copy", (4,))
    assert recovery_source(plan, 2, [0, 1, 4, 5]) == ("none", ())  # neighbour 3 lost too
    assert recovery_source(plan, 1, [0, 3]) == ("none", ())
    assert recovery_source(StagePlan(2, 3), 1, [0]) == ("none", ())
    with pytest.raises(ValueError):
        recovery_source(plan, 0, live)
    with pytest.raises(ValueError):
        lost_stages(plan, [6])


def test_rebuilt_stage_in_tiny_deep_model():
    model = build_model("tiny-deep", seed=0)
    plan = StagePlan(4, model.config.n_layers)
    assert [list(plan.blocks(s)) for s in (1, 2, 3)] == [[0, 1], [2], [3]]
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (2, 17), generator=generator)
    _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    params = dict(model.named_parameters())
    stage_names = plan.slices(list(params))

    def grad_norm(stage: int) -> float:  # pre-clip, as a stage peer would record it
        return torch.linalg.vector_norm(
            torch.stack([params[n].grad.norm() for n in stage_names[stage]])
        ).item()

    a, b = grad_norm(3), grad_norm(1)
    prev = {n: params[n].detach().clone() for n in stage_names[1]}
    nxt = {n: params[n].detach().clone() for n in stage_names[3]}
    rebuilt = rebuild_stage(plan, 2, prev, nxt, prev_grad_norm=b, next_grad_norm=a)
    assert set(rebuilt) == set(stage_names[2])
    for name, tensor in rebuilt.items():
        suffix = name.removeprefix("blocks.2.")
        expected = (a * nxt[f"blocks.3.{suffix}"] + b * prev[f"blocks.0.{suffix}"]) / (a + b)
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        for name, tensor in rebuilt.items():
            params[name].copy_(tensor)
        _, loss = model(batch[:, :-1], batch[:, 1:])
    assert math.isfinite(loss.item())
