"""A pipeline step computes the unsplit model's gradients (compression off), and the pieces
that make it: the stage plan, stage modules with the model's weights, recomputation.

The hops here are in-process calls into StageService with the real message payloads and
codecs; tests/swarm/test_pipeline_swarm.py runs the same over sockets."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from shoal.optim.inner import InnerConfig
from shoal.pipeline.compression import parse_activation
from shoal.pipeline.driver import DriverConfig, PipelineDriver
from shoal.pipeline.routing import build_router
from shoal.pipeline.service import StageService
from shoal.pipeline.stages import StagePlan, build_stage
from shoal.pipeline.subspace import confine_module
from shoal.pipeline.worker import BlockWorker, EdgeWorker
from shoal.train import PRESETS, build_model, parameter_names

CONFIG = PRESETS["tiny"]
SEED = 3


def test_plan_splits_blocks_evenly_and_covers_the_model():
    plan = StagePlan(4, 5)
    assert [list(plan.blocks(s)) for s in range(4)] == [[], [0, 1], [2, 3], [4]]
    names = parameter_names(build_model(CONFIG, 0))
    slices = StagePlan(3, CONFIG.n_layers).slices(names)
    assert slices[0] == ["embed.weight", "norm.weight"]
    assert sorted(sum(slices, [])) == sorted(names)
    with pytest.raises(ValueError, match="--stages"):
        StagePlan(CONFIG.n_layers + 2, CONFIG.n_layers)


def test_stages_hold_the_full_models_initial_weights():
    plan = StagePlan(3, CONFIG.n_layers)
    full = dict(build_model(CONFIG, SEED).named_parameters())
    for stage in range(3):
        for name, param in build_stage(CONFIG, plan, stage, SEED).named_parameters():
            assert torch.equal(param, full[name]), name


class InProcess:
    """Routes the driver's hops to StageService objects, through the real payloads."""

    def __init__(self, services: dict[str, StageService]):
        self.services = services
        self.calls: list[str] = []

    async def __call__(self, peer: str, path: str, payload: dict, timeout_s: float) -> dict:
        self.calls.append(path)
        service = self.services[peer]
        handler = {
            "/stage/forward": service.forward,
            "/stage/infer": service.infer,
            "/stage/backward": service.backward,
            "/stage/step": service.step,
        }[path]
        return await asyncio.wait_for(handler(payload), timeout_s)


def make_pipeline(num_stages: int, activation: str = "none", microbatch_size: int = 2):
    plan = StagePlan(num_stages, CONFIG.n_layers)
    inner = InnerConfig(lr=1e-3, batch_size=8, seq_len=16)
    setting = parse_activation(activation, CONFIG, SEED)
    compute = ThreadPoolExecutor(1)
    edge = EdgeWorker(build_stage(CONFIG, plan, 0, SEED), inner, torch.device("cpu"), setting.basis)
    workers = {
        f"s{k}": BlockWorker(
            build_stage(CONFIG, plan, k, SEED), inner, torch.device("cpu"), setting.basis
        )
        for k in range(1, num_stages)
    }
    services = {
        f"s{k}": StageService(workers[f"s{k}"], k, setting, CONFIG, compute, lambda: 0)
        for k in range(1, num_stages)
    }
    call = InProcess(services)
    driver = PipelineDriver(
        edge,
        plan,
        setting.codec,
        build_router("random", 0),
        call,
        lambda stage: [f"s{stage}"],
        compute,
        DriverConfig(microbatch_size=microbatch_size, max_in_flight=3),
    )
    return driver, edge, workers, call


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (8, 16), generator=generator)
    return x, torch.roll(x, -1, dims=1)


def test_three_stage_gradients_equal_the_unsplit_models():
    driver, edge, workers, call = make_pipeline(3)
    x, y = batch()
    loss, done = asyncio.run(driver.accumulate(x, y))
    assert done == 4

    model = build_model(CONFIG, SEED)
    _, full_loss = model(x, y)
    full_loss.backward()
    expected = {n: p.grad for n, p in model.named_parameters()}

    assert loss == pytest.approx(float(full_loss.detach()), rel=1e-5)
    got = {}
    for trainer in [edge, *workers.values()]:
        assert trainer.microbatches == 4
        got.update({n: p.grad / trainer.microbatches for n, p in trainer.params.items()})
    assert set(got) == set(expected)
    for name, grad in expected.items():
        difference = float((got[name] - grad).abs().max() / grad.abs().max())
        assert difference < 1e-4, (name, difference)
    assert call.calls.count("/stage/forward") == 8 and call.calls.count("/stage/backward") == 8


def test_a_step_moves_every_stage_and_frees_saved_inputs():
    driver, edge, workers, _ = make_pipeline(3)
    before = {n: p.detach().clone() for w in [edge, *workers.values()] for n, p in w.params.items()}
    result = asyncio.run(driver.train_step(*batch(), step=0))
    assert result.tokens == 8 * 16 and result.retries == 0
    for trainer in [edge, *workers.values()]:
        assert trainer.step_count == 1 and trainer.microbatches == 0
        assert all(not torch.equal(p, before[n]) for n, p in trainer.params.items())
    assert all(w.in_flight == 0 for w in workers.values())


def test_int8_activations_stay_close_to_the_exact_loss():
    exact, *_ = make_pipeline(3)
    lossy, *_ = make_pipeline(3, "int8")
    x, y = batch(1)
    assert asyncio.run(lossy.evaluate([(x, y)])) == pytest.approx(
        asyncio.run(exact.evaluate([(x, y)])), rel=1e-3
    )


@pytest.mark.parametrize(
    ("spec", "tolerance"),
    [("subspace:8", 1e-3), ("subspace-int8:8", 3e-3), ("subspace-int4:8", 1e-2)],
)
def test_subspace_pipeline_computes_the_confined_models_loss(spec, tolerance):
    """With the weights confined to E0[token] + span(U), sending k of d_model coordinates
    per token loses nothing but the coordinates' rounding (float16, int8 with twice the
    k, or 4 bits with four times): the pipeline's loss is the confined unsplit model's."""
    setting = parse_activation(spec, CONFIG, SEED)
    driver, edge, workers, _ = make_pipeline(3, spec)
    x, y = batch(1)
    for _ in range(3):  # move the weights off their initial values first
        asyncio.run(driver.train_step(x, y, step=0))
    with (
        torch.no_grad()
    ):  # and the embedding off E0 + span(U), as the tied head's gradient moves it
        edge.params["embed.weight"].add_(
            torch.randn(
                edge.params["embed.weight"].shape, generator=torch.Generator().manual_seed(3)
            ),
            alpha=0.05,
        )
    model = build_model(CONFIG, SEED)
    with torch.no_grad():
        for trainer in [edge, *workers.values()]:
            for name, param in trainer.params.items():
                model.get_parameter(name).copy_(param)
    confine_module(model, setting.basis)  # its lookup writes the confined view, as stage 0's does
    _, loss = model(x, y)
    assert asyncio.run(driver.evaluate([(x, y)])) == pytest.approx(
        float(loss.detach()), rel=tolerance
    )


def test_activation_flag():
    small = PRESETS["small"]  # d_model 128: raw float32 is 512 bytes per token
    assert parse_activation("subspace:32", small, SEED).basis.k == 7  # 2·7 + 1 token id byte
    setting = parse_activation("subspace-int8:32", small, SEED)
    assert setting.basis.k == 14 and setting.codec.name == "subspace-int8"  # 14 + 1 + 1
    assert 4 * small.d_model / (setting.codec.bytes_per_token(small.d_model) + 1) >= 32
    setting = parse_activation("subspace-int4:32", small, SEED)
    assert (
        setting.basis.k == 28 and setting.codec.bytes_per_token(small.d_model) == 15
    )  # 14 + 1, + 1 token id
    assert parse_activation("int8", small, SEED).basis is None
    for bad, message in [
        ("subspace", "needs a ratio"),
        ("subspace-int8:x", "needs a ratio"),
        ("subspace:0.5", ">= 1"),
        ("int8:4", "takes no ratio"),
        ("fp8", "must be none, int8"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_activation(bad, small, SEED)
