"""Routes through the pipeline: the planners (full, out-of-order, SkipPipe), the driver
following them with the right gradients, and evaluation on part of the model."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from shoal.optim.inner import InnerConfig
from shoal.pipeline.compression import parse_activation
from shoal.pipeline.driver import DriverConfig, PipelineDriver
from shoal.pipeline.paths import FullPaths, PathPlanner, Route, SkipPaths, build_paths
from shoal.pipeline.routing import build_router
from shoal.pipeline.service import StageService
from shoal.pipeline.skippipe import SkipPipeConfig
from shoal.pipeline.stages import StagePlan, build_stage
from shoal.pipeline.worker import BlockWorker, EdgeWorker, residual_scale
from shoal.train import PRESETS
from tests.pipeline.test_pipeline_grad import InProcess, batch

CONFIG = PRESETS["tiny-deep"]  # 4 blocks: 5 stages of one block each
SEED = 3
STAGES = 5


class Fixed(PathPlanner):
    name = "fixed"

    def __init__(self, stages: list[int]) -> None:
        self.stages, self.num_stages = stages, STAGES

    def plan(self, microbatches, tokens, served=None) -> list[Route]:
        return [[(s, None) for s in self.stages]] * microbatches


class Scaled(Fixed):
    """A fixed route whose stages run with given residual scales."""

    def __init__(self, stages: list[int], scales: dict[int, float]) -> None:
        super().__init__(stages)
        self.scales = scales

    def residual_scale(self, stage: int, route: Route) -> float:
        return self.scales.get(stage, 1.0)


def pipeline(paths: PathPlanner | None = None, replicas: int = 1, router=None):
    plan = StagePlan(STAGES, CONFIG.n_layers)
    inner = InnerConfig(lr=1e-3, batch_size=8, seq_len=16)
    setting = parse_activation("none", CONFIG, SEED)
    compute = ThreadPoolExecutor(1)
    edge = EdgeWorker(build_stage(CONFIG, plan, 0, SEED), inner, torch.device("cpu"))
    peers = {f"s{k}.{r}": k for k in range(1, STAGES) for r in range(replicas)}
    workers = {
        p: BlockWorker(build_stage(CONFIG, plan, k, SEED), inner, torch.device("cpu"))
        for p, k in peers.items()
    }
    services = {
        p: StageService(workers[p], k, setting, CONFIG, compute, lambda: 0)
        for p, k in peers.items()
    }
    router = router or build_router("swarm", 0)
    driver = PipelineDriver(
        edge,
        plan,
        setting.codec,
        router,
        InProcess(services),
        lambda s: [p for p, k in peers.items() if k == s],
        compute,
        DriverConfig(microbatch_size=2, max_in_flight=2),
        paths=paths,
    )
    return driver, edge, workers


def reference(stages: list[int], x, y, scales: dict[int, float] | None = None):
    """The same weights run as one graph: embedding, the blocks of `stages` in that order
    (block k's residual update scaled by scales[k]), loss."""
    plan = StagePlan(STAGES, CONFIG.n_layers)
    edge = build_stage(CONFIG, plan, 0, SEED)
    blocks = {k: build_stage(CONFIG, plan, k, SEED) for k in range(1, STAGES)}
    h = edge.embed_tokens(x)
    for k in stages:
        c = (scales or {}).get(k, 1.0)
        h = h + c * (blocks[k](h) - h)
    loss = edge.loss(h, y)
    loss.backward()
    return float(loss.detach()), edge, blocks


def test_full_paths_visit_every_stage_and_swap_the_edge_pairs_for_a_share():
    assert FullPaths(6).plan(3, 8) == [[(s, None) for s in range(1, 6)]] * 3
    routes = FullPaths(6, swap_fraction=0.5).plan(8, 8)
    swapped = [r for r in routes if r != FullPaths(6).route()]
    assert len(swapped) == 4 and all([s for s, _ in r] == [2, 1, 3, 5, 4] for r in swapped)
    assert [s for s, _ in FullPaths(3, 1.0).route(swapped=True)] == [
        2,
        1,
    ]  # two block stages: one pair
    with pytest.raises(ValueError, match="out-of-order"):
        FullPaths(2, 0.5)
    with pytest.raises(ValueError, match="pick one"):
        build_paths(6, 0.33, 0.5, "d", build_router("swarm", 0))


@pytest.mark.parametrize(
    "stages, scales",
    [([1, 3, 4], {}), ([2, 1, 3, 4], {}), ([1, 2, 4, 3], {}), ([1, 3, 4], {3: 2**0.5, 4: 2.0})],
)
def test_the_driver_follows_a_route_and_the_gradients_are_that_routes(stages, scales):
    driver, edge, workers = pipeline(Scaled(stages, scales))
    x, y = batch()
    loss, done = asyncio.run(driver.accumulate(x, y))
    ref_loss, ref_edge, ref_blocks = reference(stages, x, y, scales)
    assert done == 4 and loss == pytest.approx(ref_loss, rel=1e-5)
    pairs = [(edge, ref_edge)] + [(workers[f"s{k}.0"], ref_blocks[k]) for k in range(1, STAGES)]
    for trainer, module in pairs:
        expected = dict(module.named_parameters())
        if trainer is not edge and int(next(iter(trainer.params)).split(".")[1]) + 1 not in stages:
            assert trainer.microbatches == 0 and all(
                p.grad is None for p in trainer.params.values()
            )
            continue
        assert trainer.microbatches == 4
        for name, param in trainer.params.items():
            grad = expected[name].grad
            assert float((param.grad / 4 - grad).abs().max() / grad.abs().max()) < 1e-4, name


def test_evaluation_on_part_of_the_model():
    driver, _, _ = pipeline()
    x, y = batch(1)
    half = asyncio.run(driver.evaluate([(x, y)], stages=[1, 3]))
    assert half == pytest.approx(reference([1, 3], x, y)[0], rel=1e-5)
    assert asyncio.run(driver.evaluate([(x, y)])) == pytest.approx(
        reference([1, 2, 3, 4], x, y)[0], rel=1e-5
    )
    for bad in ([], [0, 1], [1, 1], [5]):
        with pytest.raises(ValueError, match="distinct block stages"):
            asyncio.run(driver.evaluate([(x, y)], stages=bad))


def test_skippipe_plans_skip_stages_and_avoid_the_slow_replica():
    router = build_router("swarm", 0)
    served = {s: [f"s{s}.0", f"s{s}.1"] for s in range(1, 6)}
    for peer in (p for peers in served.values() for p in peers):
        router.report(
            peer, seconds=1.0, task_size=1000 if peer != "s3.0" else 100
        )  # s3.0 is 10x slower
    planner = SkipPaths(SkipPipeConfig(num_stages=6), "driver", router)
    routes = planner.plan(8, 64, served)
    assert len(routes) == 8 and planner.last_iteration_s > 0
    for route in routes:
        stages = [s for s, _ in route]
        assert len(stages) == 3 and len(set(stages)) == 3  # 4 of 6 stages, stage 0 counted
        assert all(peer in served[s] for s, peer in route)
    used = [peer for route in routes for _, peer in route]
    assert used.count("s3.0") < used.count("s3.1")
    # too few stages served for paths of 4: the step runs as the full pipeline
    assert planner.plan(2, 64, {1: ["a"], 2: [], 3: [], 4: [], 5: []}) == FullPaths(6).plan(2, 64)
    assert planner.fallbacks == 1


def test_a_skippipe_step_trains_through_the_runtime():
    router = build_router("swarm", 0)
    driver, edge, workers = pipeline(
        build_paths(STAGES, 0.25, 0.0, "driver", router), replicas=2, router=router
    )
    x, y = batch()
    before = asyncio.run(driver.evaluate([(x, y)]))
    for step in range(3):
        result = asyncio.run(driver.train_step(x, y, step))
        assert result.tokens == x.numel()
    assert asyncio.run(driver.evaluate([(x, y)])) < before
    seen = sum(w.step_count > 0 for w in workers.values())
    assert seen >= 4  # every stage was visited by some microbatch, on some replica


def test_skippipe_defaults_keep_stage_one_first_and_every_route_in_order():
    router = build_router("swarm", 0)
    served = {s: [f"s{s}.0"] for s in range(1, 6)}
    for peers in served.values():
        router.report(peers[0], seconds=1.0, task_size=1000)
    planner = build_paths(6, 0.33, 0.0, "driver", router)
    assert (planner.describe()["max_swaps"], planner.describe()["kept_stages"]) == (0, [1])
    routes = planner.plan(12, 64, served)
    for route in routes:
        stages = [s for s, _ in route]
        assert stages == sorted(stages) and len(stages) == 3 and stages[0] == 1
    skipped = [s for route in routes for s, _ in route[1:]]
    assert (
        len(skipped) == 24 and max(map(skipped.count, set(skipped))) <= 8
    )  # the cap: the even 6, +25% slack
    unkept = build_paths(6, 0.33, 0.0, "driver", router, skip_keep=())
    assert any(route[0][0] != 1 for route in unkept.plan(12, 64, served))


def test_skippipe_residual_scales():
    router = build_router("swarm", 0)
    route = [(1, None), (3, None), (5, None)]
    sqrt = build_paths(
        6, 0.33, 0.0, "driver", router, skip_rescale="sqrt"
    )  # 4 of 6: stage 1 kept, the others on 1 path in 2
    assert sqrt.residual_scale(1, route) == 1.0 and sqrt.residual_scale(3, route) == pytest.approx(
        2**0.5
    )
    assert (
        sqrt.residual_scale(3, FullPaths(6).route()) == 1.0
    )  # a step planned as the full pipeline
    assert sqrt.describe()["residual_scale"] == pytest.approx(2**0.5)
    assert build_paths(6, 0.33, 0.0, "driver", router, skip_rescale="inverse").residual_scale(
        3, route
    ) == pytest.approx(2.0)
    assert (
        build_paths(6, 0.33, 0.0, "driver", router, skip_rescale="none").residual_scale(3, route)
        == 1.0
    )
    unkept = build_paths(
        6, 0.33, 0.0, "driver", router, skip_keep=(), skip_rescale="sqrt"
    )  # 3 of 5 block stages
    assert unkept.residual_scale(1, route) == pytest.approx(0.6**-0.5)
    assert FullPaths(6).residual_scale(3, route) == 1.0
    only_kept = build_paths(
        5, 0.4, 0.0, "driver", router, skip_keep=(1, 2), skip_rescale="sqrt"
    )  # paths: 1, 2; 3, 4 never
    assert only_kept.residual_scale(3, [(1, None), (2, None)]) == 1.0
    for mode, p in (("cube", 0.5), ("sqrt", 0.0), ("sqrt", 1.5)):
        with pytest.raises(ValueError):
            residual_scale(mode, p)
    worker = pipeline()[2]["s1.0"]
    h = torch.randn(2, 4, CONFIG.d_model)
    for bad in ({"scale": float("nan")}, {"scale": 0.0}, {"scale": 2.0, "keep": False}):
        with pytest.raises(ValueError, match="scale"):
            worker.forward("mb", h, **bad)
    assert worker.in_flight == 0
