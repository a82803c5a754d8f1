import pytest
import torch

from shoal.optim.diloco import DiLoCo, overlaps
from shoal.optim.outer import ContributionError, OuterConfig, weights_hash


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, 16, generator=g), "b": torch.randn(33, generator=g)}


def test_outer_step_matches_torch_sgd_nesterov():
    start = weights()
    outer = DiLoCo(start, OuterConfig(codec="fp32", lr=0.7, momentum=0.9))
    ref = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    opt = torch.optim.SGD(ref.values(), lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(3):
        locals_ = [
            {n: t - 0.01 * torch.randn_like(t) for n, t in outer.params.items()} for _ in range(3)
        ]
        decoded = [outer.decode_contribution(outer.contribution(loc)) for loc in locals_]
        outer.apply(decoded)
        for n, p in ref.items():
            p.grad = sum(p.detach() - loc[n] for loc in locals_) / 3
        opt.step()
        for n in start:
            torch.testing.assert_close(outer.params[n], ref[n].detach(), rtol=1e-6, atol=1e-6)


def test_int8_contribution_is_a_quarter_and_close():
    outer = DiLoCo({"w": torch.zeros(256, 1024)}, OuterConfig(codec="int8"))
    local = {"w": torch.randn(256, 1024) * 1e-3}
    payload = outer.contribution(local)
    assert len(payload["w"]) < 0.26 * 4 * 256 * 1024
    decoded = outer.decode_contribution(payload)["w"]
    assert torch.linalg.norm(decoded + local["w"]) / torch.linalg.norm(local["w"]) < 0.02


def test_apply_is_order_fixed_and_deterministic():
    a, b = (
        DiLoCo(weights(), OuterConfig(codec="fp32")),
        DiLoCo(weights(), OuterConfig(codec="fp32")),
    )
    contributions = [{n: torch.randn_like(t) for n, t in weights().items()} for _ in range(4)]
    a.apply(contributions)
    b.apply(contributions)
    assert a.weights_hash() == b.weights_hash() != weights_hash(weights())


def test_empty_round_changes_nothing():
    outer = DiLoCo(weights(), OuterConfig(codec="fp32"))
    before = outer.weights_hash()
    outer.apply([])
    assert outer.weights_hash() == before


def test_bad_contributions_are_rejected():
    outer = DiLoCo(weights(), OuterConfig(codec="fp32"))
    good = outer.contribution(weights(1))
    with pytest.raises(ContributionError, match="missing"):
        outer.decode_contribution({"a": good["a"]})
    with pytest.raises(ContributionError, match="unexpected"):
        outer.decode_contribution({**good, "c": good["a"]})
    with pytest.raises(ContributionError, match="a:"):
        outer.decode_contribution({**good, "a": good["b"]})  # wrong size for a's shape
    with pytest.raises(ContributionError):
        outer.decode_contribution({**good, "a": "text"})
    with pytest.raises(ValueError):  # NaN refused when encoding, before anything is sent
        outer.contribution({**weights(1), "b": torch.full((33,), float("nan"))})


def test_state_round_trip():
    outer = DiLoCo(weights(), OuterConfig(codec="fp32"))
    outer.apply([{n: torch.randn_like(t) for n, t in weights().items()}])
    other = DiLoCo(weights(5), OuterConfig(codec="fp32"))
    other.load_state_tensors(outer.state_tensors())
    assert other.weights_hash() == outer.weights_hash()
    assert torch.equal(other.momentum["a"], outer.momentum["a"])
    with pytest.raises(ValueError):
        other.load_state_tensors({"outer/a": torch.zeros(1)})


def test_stage_slices_average_with_the_full_replicas_same_tensors():
    """A full replica holds slices a and b; a stage peer holds b only. Each tensor is
    averaged over the contributions that hold it, so both end with the same b."""
    slices = [["a"], ["b"]]
    config = OuterConfig(codec="fp32")
    full = DiLoCo(weights(), config, slices)
    stage = DiLoCo({"b": weights()["b"]}, config, slices)
    full_local = {n: t - 0.1 for n, t in weights().items()}
    stage_local = {"b": weights()["b"] - 0.3}
    from_full, from_stage = full.contribution(full_local), stage.contribution(stage_local)
    for outer in (full, stage):
        outer.apply([outer.decode_contribution(from_full), outer.decode_contribution(from_stage)])
    torch.testing.assert_close(full.params["b"], stage.params["b"])
    expected_b = (
        weights()["b"] - 0.7 * (1 + 0.9) * 0.2
    )  # mean Δ = (0.1 + 0.3)/2, Nesterov first step
    torch.testing.assert_close(stage.params["b"], expected_b)
    expected_a = weights()["a"] - 0.7 * 1.9 * 0.1  # a: the full replica alone
    torch.testing.assert_close(full.params["a"], expected_a)
    assert stage.decode_contribution({"a": from_full["a"]}) == {}  # another slice: nothing of ours
    with pytest.raises(ContributionError, match="missing"):
        DiLoCo(weights(), config, [["a", "b"]]).decode_contribution(
            {"a": from_full["a"]}
        )  # half a slice
    with pytest.raises(ContributionError, match="unexpected"):
        stage.decode_contribution({**from_full, "c": from_full["a"]})
    with pytest.raises(ValueError, match="no slice"):
        DiLoCo(weights(), config, [["a"]])


def test_flat_delta_and_apply_mean_are_apply_of_the_mean():
    """The reduce-scatter path (one flat vector, stepped in place) takes the same step, bit
    for bit, as `apply` with that mean as the one contribution."""
    flat_path = DiLoCo(weights(), OuterConfig(codec="fp32", lr=0.7, momentum=0.9))
    dict_path = DiLoCo(weights(), OuterConfig(codec="fp32", lr=0.7, momentum=0.9))
    for seed in (1, 2):  # twice: the second step uses the momentum of the first
        local = weights(seed)
        flat = flat_path.flat_delta(local)
        deltas = {n: flat_path.params[n] - local[n] for n in local}
        assert torch.equal(flat, torch.cat([deltas[n].reshape(-1) for n in flat_path.params]))
        flat_path.apply_mean(flat)
        dict_path.apply([deltas])
        assert flat_path.weights_hash() == dict_path.weights_hash()
    assert all(torch.equal(flat_path.momentum[n], dict_path.momentum[n]) for n in local)


def test_overlaps_of_two_partitions():
    assert list(overlaps([3, 0, 5], [2, 6])) == [(0, 0, 0, 0, 2), (0, 1, 2, 0, 1), (2, 1, 0, 1, 5)]
    assert list(overlaps([4], [4])) == [(0, 0, 0, 0, 4)]
    assert list(overlaps([], [])) == []


def test_apply_mean_takes_the_mean_in_shards():
    """Reduce-scatter hands the mean over as its shards, whose borders cut across tensors:
    the step equals the step with the whole vector, and is the same bits on every peer."""
    config = OuterConfig(codec="fp32", lr=0.7, momentum=0.9)
    whole, sharded, again = (DiLoCo(weights(), config) for _ in range(3))
    for seed in (1, 2):
        flat = whole.flat_delta(weights(seed))
        cuts = [0, 50, 128, 129, flat.numel()]  # "a" has 128 elements, "b" 33
        whole.apply_mean(flat.clone())
        for outer in (sharded, again):
            outer.apply_mean([flat[a:b].clone() for a, b in zip(cuts, cuts[1:], strict=False)])
    assert sharded.weights_hash() == again.weights_hash()
    for name, param in whole.params.items():
        torch.testing.assert_close(sharded.params[name], param, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="elements"):
        whole.apply_mean([flat[:10]])
