import pytest
import torch

from shoal.optim.diloco import DiLoCo
from shoal.optim.outer import ContributionError
from shoal.optim.registry import outer_config
from shoal.optim.streaming import StreamingDiLoCo, fragment_plan
from shoal.train import build_model


def model_shapes(preset="small"):
    return {n: tuple(p.shape) for n, p in build_model(preset, seed=0).named_parameters()}


@pytest.mark.parametrize("fragments", [1, 2, 3, 4, 5])
def test_plan_covers_every_element_once_and_strides_layers(fragments):
    shapes = model_shapes()
    plan = fragment_plan(shapes, fragments)
    assert len(plan) == fragments
    covered = {n: torch.zeros(torch.Size(s).numel(), dtype=torch.int32) for n, s in shapes.items()}
    for p, pieces in enumerate(plan):
        for name, a, b in pieces:
            covered[name][a:b] += 1
            if name.startswith("blocks."):
                assert int(name.split(".")[1]) % fragments == p and (a, b) == (
                    0,
                    covered[name].numel(),
                )
    assert all(bool((c == 1).all()) for c in covered.values())


def test_too_many_fragments_is_a_clear_error():
    with pytest.raises(ValueError, match="leaves a fragment empty"):
        fragment_plan(model_shapes(), 7)  # 4 layers plus a small remainder cannot fill 7


def test_fragments_are_equal_when_layers_divide():
    shapes = model_shapes()  # small: 4 layers
    total = sum(torch.Size(s).numel() for s in shapes.values())
    for fragments in (1, 2, 4):
        sizes = [sum(b - a for _, a, b in pieces) for pieces in fragment_plan(shapes, fragments)]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == total, sizes


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.w": torch.randn(6, 5, generator=g) for i in range(4)} | {
        "embed": torch.randn(20, generator=g)
    }


def test_rounds_sync_fragments_in_turn_and_match_diloco_on_each():
    config = outer_config("streaming", codec="fp32", fragments=2, overlap=0)
    stream = StreamingDiLoCo(weights(), config)
    dense = DiLoCo(weights(), outer_config("diloco", codec="fp32"))
    assert [stream.round_steps(r, 50) for r in range(4)] == [25, 25, 25, 25]
    assert (
        sum(
            StreamingDiLoCo(weights(), outer_config("streaming", fragments=3)).round_steps(r, 50)
            for r in range(3)
        )
        == 50
    )
    for round_id in range(
        2
    ):  # one full cycle: every fragment once, so same result as one DiLoCo step
        stream.begin_round(round_id)
        locals_ = [{n: t - 0.01 * (i + 1) for n, t in weights().items()} for i in range(3)]
        stream.apply([stream.decode_contribution(stream.contribution(local)) for local in locals_])
    dense.apply(
        [
            dense.decode_contribution(
                dense.contribution({n: t - 0.01 * (i + 1) for n, t in weights().items()})
            )
            for i in range(3)
        ]
    )
    for name in dense.params:
        torch.testing.assert_close(stream.params[name], dense.params[name])
        torch.testing.assert_close(stream.momentum[name], dense.momentum[name])


def test_merge_mixes_only_the_synced_fragment():
    stream = StreamingDiLoCo(
        weights(), outer_config("streaming", codec="fp32", fragments=2, overlap=0, mix=0.25)
    )
    stream.begin_round(1)
    local = {n: t + 1.0 for n, t in weights().items()}
    stream.apply([stream.decode_contribution(stream.contribution(local))])
    merged = stream.merged_local(local)
    synced = {n for n, _, _ in stream.plan[1]}
    for name, tensor in merged.items():
        if name.startswith("blocks.") and name not in synced:
            torch.testing.assert_close(tensor, local[name])  # untouched
    torch.testing.assert_close(
        merged["blocks.1.w"], 0.25 * local["blocks.1.w"] + 0.75 * stream.params["blocks.1.w"]
    )


def test_decode_refuses_another_rounds_fragment_and_non_finite():
    stream = StreamingDiLoCo(
        weights(), outer_config("streaming", codec="fp32", fragments=2, overlap=0)
    )
    stream.begin_round(0)
    payload = stream.contribution({n: t + 0.1 for n, t in weights().items()})
    stream.begin_round(1)
    with pytest.raises(ContributionError, match="fragment/1"):
        stream.decode_contribution(payload)
    stream.begin_round(0)
    bad = {"fragment/0": stream.codec.encode(torch.zeros(stream.fragment_numel()))[:-3]}
    with pytest.raises(ContributionError):
        stream.decode_contribution(bad)


def test_q4_payload_is_a_fragment_of_the_dense_one():
    shapes = model_shapes()
    start = {n: torch.zeros(s) for n, s in shapes.items()}
    local = {n: 1e-3 * torch.randn(s) for n, s in shapes.items()}
    stream = StreamingDiLoCo(start, outer_config("streaming"))  # P = 4, q4
    dense = DiLoCo(start, outer_config("diloco", codec="q4"))
    dense_bytes = sum(len(b) for b in dense.contribution(local).values())
    for round_id in range(4):
        stream.begin_round(round_id)
        assert sum(len(b) for b in stream.contribution(local).values()) <= dense_bytes / 4 + 64
