"""A pipeline replica (stage peers over real sockets) trains beside full replicas: rounds
average every stage's slice with the full replicas' same tensors, stage peers of one
slice agree bit for bit, and the pipeline's held-out loss falls."""

import torch
from conftest import run_async, stop_all, tiny_run, wait_until

from shoal.peer.node import Peer
from shoal.train import PRESETS


def pipelined_run(stages: int = 4):
    return tiny_run(model_preset="tiny-deep", model=PRESETS["tiny-deep"].to_dict(), stages=stages)


def config(corpus, peer_id, bootstrap=None, stages=4, **kw):
    from conftest import peer_config

    return peer_config(corpus, peer_id, bootstrap, run=pipelined_run(stages), **kw)


async def start(corpus, specs, **kw):
    """Start peers from (peer_id, role, stage) specs; the first is the bootstrap."""
    first_id, role, stage = specs[0]
    first = Peer(config(corpus, first_id, role=role, stage=stage, **kw))
    await first.start()
    rest = [
        Peer(config(corpus, pid, first.address, role=role, stage=stage, **kw))
        for pid, role, stage in specs[1:]
    ]
    for peer in rest:  # one at a time: stage peers without --stage pick from what they see
        await peer.start()
    return [first, *rest]


def test_pipeline_replica_trains_with_full_replicas(corpus):
    async def scenario():
        specs = [
            ("full-0", "replica", None),
            ("full-1", "replica", None),
            ("stage-0", "stage", 0),
            ("stage-1", "stage", 1),
            ("stage-2", "stage", 2),
            ("stage-3", "stage", 3),
        ]
        peers = await start(corpus, specs, max_rounds=3, min_peers=6)
        by_id = {p.peer_id: p for p in peers}
        try:
            await wait_until(lambda: all(p.finished.is_set() for p in peers), 150, "3 rounds")
            for peer in peers:
                assert peer.error is None, (peer.peer_id, peer.error)
                assert peer.outer_round == 3
                assert sorted(peer.round_log[-1]["applied"]) == sorted(by_id), peer.peer_id
            # every stage's slice of the outer weights equals the full replicas' same tensors
            full = by_id["full-0"].engine.outer.params
            for k in range(4):
                stage_params = by_id[f"stage-{k}"].engine.outer.params
                assert stage_params and set(stage_params) < set(full)
                for name, tensor in stage_params.items():
                    assert torch.equal(tensor, full[name]), name
            # the pipeline trained: its held-out loss (stage 0 evaluates through the chain) fell
            driver = by_id["stage-0"]
            losses = [e["eval_loss"] for e in driver.round_log]
            assert losses[-1] < losses[0] - 0.1, losses
            # hops crossed the sockets
            assert (
                by_id["stage-1"].traffic.received["forward"] > 0
                and by_id["stage-1"].traffic.received["backward"] > 0
            )
        finally:
            await stop_all(peers)

    run_async(scenario(), 180)


def test_stage_peer_without_stage_takes_the_least_served(corpus):
    async def scenario():
        specs = [
            ("stage-0", "stage", 0),
            ("stage-1", "stage", 1),
            ("stage-3", "stage", 3),
            ("auto", "stage", None),
        ]
        peers = await start(corpus, specs, max_rounds=1, min_peers=1)
        try:
            await wait_until(lambda: peers[-1].membership.me.stage is not None, 10, "auto stage")
            assert peers[-1].membership.me.stage == 2
        finally:
            await stop_all(peers)

    run_async(scenario(), 60)


def test_skippipe_paths_keep_the_first_block_stage(corpus):
    """5 stages, --skip-ratio 0.4: every path visits stage 1 (kept) and one of stages 2-4, so
    stage 1 serves every training microbatch's backward and the other three share as many."""

    async def scenario():
        specs = [("stage-0", "stage", 0), *((f"stage-{k}", "stage", k) for k in range(1, 5))]
        peers = await start(
            corpus, specs, stages=5, max_rounds=2, min_peers=5, skip_ratio=0.4, microbatch_size=1
        )
        by_id = {p.peer_id: p for p in peers}
        try:
            await wait_until(lambda: all(p.finished.is_set() for p in peers), 120, "2 rounds")
            for peer in peers:
                assert peer.error is None, (peer.peer_id, peer.error)
            paths = by_id["stage-0"].role.paths.describe()
            assert (
                paths["paths"],
                paths["stages_per_path"],
                paths["kept_stages"],
                paths["fallbacks"],
            ) == ("skippipe", 3, [1], 0)
            assert (
                abs(paths["residual_scale"] - 3**0.5) < 1e-9
            )  # --skip-rescale sqrt: stages 2-4 are on 1 path in 3
            backward = {
                k: by_id[f"stage-{k}"].traffic.received["backward"] for k in range(1, 5)
            }  # same-size payloads
            others = sum(backward[k] for k in (2, 3, 4))
            assert abs(others - backward[1]) <= 0.03 * backward[1], (
                backward
            )  # one other stage per path
            assert max(backward[k] for k in (2, 3, 4)) < backward[1], backward
        finally:
            await stop_all(peers)

    run_async(scenario(), 150)
