import torch

from shoal.optim.outer import OuterConfig
from shoal.optim.registry import build_outer, outer_config
from shoal.optim.sparseloco import SparseLoCo

CONFIG = outer_config("sparseloco")


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(130, 70, generator=g), "b": torch.randn(5000, generator=g)}


def drifted(outer, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return {n: t - scale * torch.randn(t.shape, generator=g) for n, t in outer.params.items()}


def test_defaults_follow_the_paper():
    assert (CONFIG.lr, CONFIG.momentum, CONFIG.codec, CONFIG.error_decay, CONFIG.topk) == (
        1.0,
        0.0,
        "topk",
        0.95,
        64,
    )
    assert isinstance(build_outer(weights(), CONFIG), SparseLoCo)


def test_error_feedback_keeps_what_was_not_sent():
    opt = SparseLoCo(weights(), CONFIG)
    local = drifted(opt, 1)
    delta = {n: opt.params[n] - local[n] for n in opt.params}
    sent = opt.decode_contribution(opt.contribution(local))
    for name in opt.params:
        dense = torch.zeros(opt.params[name].numel())
        dense[sent.indices[name]] = sent.values[name]
        # e = Δ − decoded(sent): sent + error reconstructs Δ exactly
        torch.testing.assert_close(dense.view_as(delta[name]) + opt.error[name], delta[name])
        assert sent.indices[name].numel() <= opt.params[name].numel() * 64 / 4096 + 64 * 4
    # next round: the buffer decays by β and gains the new Δ
    before = {n: e.clone() for n, e in opt.error.items()}
    local2 = drifted(opt, 2)
    sent2 = opt.decode_contribution(opt.contribution(local2))
    for name in opt.params:
        dense = torch.zeros(opt.params[name].numel())
        dense[sent2.indices[name]] = sent2.values[name]
        expected = 0.95 * before[name] + (opt.params[name] - local2[name])
        torch.testing.assert_close(dense.view_as(expected) + opt.error[name], expected)


def test_aggregate_is_a_per_index_mean_over_senders():
    opt = SparseLoCo(
        {"x": torch.zeros(8)}, OuterConfig(name="sparseloco", codec="topk", lr=1.0, momentum=0.0)
    )
    from shoal.optim.sparseloco import SparseContribution

    a = SparseContribution({"x": torch.tensor([0, 1])}, {"x": torch.tensor([1.0, 1.0])})
    b = SparseContribution({"x": torch.tensor([1, 2])}, {"x": torch.tensor([3.0, -1.0])})
    c = SparseContribution({"x": torch.tensor([5, 6])}, {"x": torch.tensor([1.0, 1.0])})
    opt.apply([a, b, c])  # all norms under the median-clip: a=√2, c=√2, b=√10 → b scaled to √2/√10
    s = (2**0.5) / (10**0.5)
    expected = -torch.tensor([1.0, (1.0 + 3.0 * s) / 2, -1.0 * s, 0, 0, 1.0, 1.0, 0])
    torch.testing.assert_close(opt.params["x"], expected)


def test_huge_contribution_is_clipped_to_the_median_norm():
    honest = [SparseLoCo(weights(), CONFIG) for _ in range(3)]
    contributions = [
        o.decode_contribution(o.contribution(drifted(o, i))) for i, o in enumerate(honest)
    ]
    attacker = SparseLoCo(weights(), CONFIG)
    attack = attacker.decode_contribution(
        attacker.contribution(
            {n: t - 1e6 * torch.randn_like(t) for n, t in attacker.params.items()}
        )
    )
    with_attack = SparseLoCo(weights(), CONFIG)
    with_attack.apply(contributions[:2] + [attack])
    # each contribution is clipped to the round's median norm, so the per-index mean of 3 of
    # them is at most √3 · median, however large the attacker's
    median = sorted([contributions[0].norm(), contributions[1].norm(), attack.norm()])[1]
    assert attack.norm() > 1e4 * median
    bound = 3**0.5 * median
    change = (
        sum(
            float((with_attack.params[n] - weights()[n]).square().sum()) for n in with_attack.params
        )
        ** 0.5
    )
    assert change <= bound * 1.0001
    assert all(torch.isfinite(p).all() for p in with_attack.params.values())


def test_identical_inputs_give_identical_weights():
    a, b = SparseLoCo(weights(), CONFIG), SparseLoCo(weights(), CONFIG)
    makers = [SparseLoCo(weights(), CONFIG) for _ in range(3)]
    payloads = [m.contribution(drifted(m, i)) for i, m in enumerate(makers)]
    a.apply([a.decode_contribution(p) for p in payloads])
    b.apply([b.decode_contribution(p) for p in payloads])
    assert a.weights_hash() == b.weights_hash()
    assert set(a.state_tensors()) == {"outer/w", "outer/b"}  # the error buffer stays local


def test_stage_slices_clip_and_average_alike_on_full_and_stage_peers():
    """With the model split into slices, clipping is per slice, over the contributions that
    hold it: a full replica and a stage peer of slice b end with the same b."""
    start = weights()
    names = list(start)
    slices = [[names[0]], names[1:]]
    full = build_outer(start, CONFIG, slices)
    stage = build_outer({n: start[n] for n in names[1:]}, CONFIG, slices)
    other_full = build_outer(start, CONFIG, slices)
    payloads = [
        full.contribution({n: t - 0.01 for n, t in start.items()}),
        other_full.contribution({n: t + 0.02 for n, t in start.items()}),
        stage.contribution(
            {n: start[n] - 100.0 for n in names[1:]}
        ),  # a huge stage contribution: clipped
    ]
    for outer in (full, stage):
        outer.apply([outer.decode_contribution(p) for p in payloads])
    for name in names[1:]:
        torch.testing.assert_close(full.params[name], stage.params[name], rtol=0, atol=0)
        assert (
            float((stage.params[name] - start[name]).abs().max()) < 1.0
        )  # the huge one did not get through
