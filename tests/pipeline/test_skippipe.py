"""SkipPipe path scheduler (pipeline/skippipe.py): the paper's path constraints, the simulated
timeline (one task per peer at a time, memory caps, precedence with link delays), the
next-hop table, speed against the full pipeline, infeasibility errors and determinism.

Every property is checked from the returned paths and tasks, not from the scheduler's state."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter, defaultdict

import pytest

from shoal.pipeline.skippipe import (
    PeerSpec,
    Schedule,
    ScheduleInfeasible,
    SkipPipeConfig,
    full_pipeline_schedule,
    schedule,
)

EPS = 1e-9


def random_swarm(rng: random.Random, num_stages: int, empty_stage: bool = False):
    peers = []
    skipped = rng.randrange(1, num_stages) if empty_stage else None
    for stage in range(num_stages):
        if stage == skipped:
            continue
        for i in range(rng.randint(1, 2 if stage == 0 else 3)):
            forward = rng.choice([0.5, 1.0, 1.0, 2.0, 4.0]) * rng.uniform(0.8, 1.2)
            peers.append(
                PeerSpec(
                    f"s{stage}p{i}",
                    stage,
                    forward,
                    backward_s=rng.choice([None, 2.5 * forward]),
                    loss_s=rng.choice([0.0, 0.2]) if stage == 0 else 0.0,
                    memory_cap=rng.choice([None, 1, 2, 3]),
                )
            )
    ids = [p.peer_id for p in peers]
    delays = {(a, b): rng.choice([0.0, 0.1, 0.5, 2.0]) for a in ids for b in ids if a < b}
    return peers, delays


def order_swaps(stages: list[int]) -> int | None:
    """Number of adjacent swaps turning `stages` into sorted order, or None if it is not
    sorted up to disjoint swaps of consecutive stages (s+1, s)."""
    ordered, swaps, i = sorted(stages), 0, 0
    while i < len(stages):
        if stages[i] == ordered[i]:
            i += 1
        elif (
            i + 1 < len(stages)
            and (stages[i], stages[i + 1]) == (ordered[i + 1], ordered[i])
            and ordered[i + 1] == ordered[i] + 1
        ):
            swaps, i = swaps + 1, i + 2
        else:
            return None
    return swaps


def check_schedule(plan: Schedule, peers, delays, config: SkipPipeConfig, visits: int, cap):
    stage_of = {p.peer_id: p.stage_index for p in peers}
    spec = {p.peer_id: p for p in peers}
    S, M = config.num_stages, config.num_microbatches

    def hop_s(a: str, b: str) -> float:
        if a == b:
            return 0.0
        return delays.get((a, b), delays.get((b, a), 0.0)) + config.transfer_s

    assert sorted(plan.paths) == list(range(M))
    visit_counts = Counter()
    for m, path in plan.paths.items():
        assert path[0] == path[-1] and path[0][0] == 0  # same stage-0 peer: embedding, loss
        inner = [stage for stage, _ in path[1:-1]]
        assert len(path) == visits + 1 and len(set(inner)) == visits - 1 and 0 not in inner
        assert all(stage_of[peer] == stage for stage, peer in path)
        along = [0, *inner, S]  # the return to the loss counts as a jump to S
        assert all(abs(b - a) <= config.max_jump for a, b in zip(along, along[1:], strict=False))
        swaps = order_swaps(inner)
        assert swaps is not None and swaps <= config.max_swaps, inner
        assert set(config.always_visit) <= set(inner), (inner, config.always_visit)
        for (
            kept
        ) in config.always_visit:  # in its place: after every lower stage, before every higher
            at = inner.index(kept)
            assert all(s < kept for s in inner[:at]) and all(s > kept for s in inner[at + 1 :]), (
                inner
            )
        visit_counts.update(s for s in inner if s not in config.always_visit)
        for (_, a), (_, b) in zip(path, path[1:], strict=False):
            assert plan.next_hop[(m, a)] == b
    assert len(plan.next_hop) == M * visits
    if cap is not None and visit_counts:
        assert max(visit_counts.values()) <= cap
    served_free = {p.stage_index for p in peers} - {0} - set(config.always_visit)
    assert all(visit_counts[s] >= plan.stage_visit_floor for s in served_free), (
        visit_counts,
        plan.stage_visit_floor,
    )

    by_peer = defaultdict(list)
    by_mb = defaultdict(list)
    for task in plan.tasks:
        assert task.end_s >= task.start_s >= 0
        by_peer[task.peer_id].append(task)
        by_mb[task.microbatch].append(task)
    for peer, tasks in by_peer.items():  # one task at a time per peer
        busy = sorted((t.start_s, t.end_s) for t in tasks if t.end_s > t.start_s)
        assert all(e1 <= s2 + EPS for (_, e1), (s2, _) in zip(busy, busy[1:], strict=False)), peer
    for m, tasks in by_mb.items():  # forward, loss, backward in path order, links in between
        path = plan.paths[m]
        expected = (
            [(s, p, "forward") for s, p in path[:-1]]
            + [(0, path[0][1], "loss")]
            + [(s, p, "backward") for s, p in reversed(path[:-1])]
        )
        chain = sorted(tasks, key=lambda t: (t.start_s, t.kind != "forward", t.kind == "backward"))
        assert [(t.stage_index, t.peer_id, t.kind) for t in chain] == expected
        for prev, task in zip(chain, chain[1:], strict=False):
            assert task.start_s + EPS >= prev.end_s + hop_s(prev.peer_id, task.peer_id)
        for task in chain:
            duration = {"forward": spec[task.peer_id].forward_s, "loss": spec[task.peer_id].loss_s}
            want = duration.get(task.kind)
            if want is None:
                want = spec[task.peer_id].backward_s or 2.0 * spec[task.peer_id].forward_s
            assert task.end_s - task.start_s == pytest.approx(want)
        assert plan.finish_s[m] == chain[-1].end_s
    assert plan.iteration_time_s == max(t.end_s for t in plan.tasks)

    holds = defaultdict(list)  # memory: held from the first task to the last on that peer
    for (_, peer), tasks in _group(plan.tasks).items():
        holds[peer].append((min(t.start_s for t in tasks), max(t.end_s for t in tasks)))
    for peer, intervals in holds.items():
        cap_peer = spec[peer].memory_cap
        if cap_peer is None:
            continue
        events = sorted([(e, -1) for _, e in intervals] + [(s, 1) for s, _ in intervals])
        held = 0
        for _, delta in events:
            held += delta
            assert held <= cap_peer, (peer, intervals)


def _group(tasks):
    grouped = defaultdict(list)
    for task in tasks:
        grouped[(task.microbatch, task.peer_id)].append(task)
    return grouped


def test_random_swarms_satisfy_every_constraint():
    rng = random.Random(2502_19913)
    planned = with_kept = 0
    for trial in range(120):
        num_stages = rng.randint(3, 8)
        peers, delays = random_swarm(rng, num_stages, empty_stage=trial % 5 == 0)
        visits = rng.randint(max(2, num_stages - 3), num_stages)
        kept = rng.choice([(), (), (1,), (1, num_stages - 1), (rng.randrange(1, num_stages),)])
        config = SkipPipeConfig(
            num_stages=num_stages,
            num_microbatches=rng.randint(1, 10),
            stages_per_path=visits,
            always_visit=tuple(sorted(set(kept)))[: visits - 1],
            max_swaps=rng.choice([0, 1, 2]),
            stage_visit_cap=rng.choice([None, None, 10]),
            transfer_s=rng.choice([0.0, 0.05]),
            visit_slack=rng.choice([0.0, 0.0, 0.25]),
        )
        served = len({p.stage_index for p in peers} - {0})
        try:
            plan = schedule(peers, config, delays)
        except ScheduleInfeasible as exc:
            assert exc.constraints, exc
            continue
        free, free_stages = visits - 1 - len(config.always_visit), served - len(config.always_visit)
        even = math.ceil(config.num_microbatches * free / free_stages) if free else 0
        assert plan.stage_visit_cap == (config.stage_visit_cap or plan.stage_visit_cap) >= even
        check_schedule(plan, peers, delays, config, visits, plan.stage_visit_cap)
        with_kept += bool(config.always_visit)
        if served == num_stages - 1:
            full = full_pipeline_schedule(peers, config, delays)
            check_schedule(full, peers, delays, config, num_stages, None)
            assert all([s for s, _ in p] == [*range(num_stages), 0] for p in full.paths.values())
        planned += 1
    assert planned >= 90 and with_kept >= 30  # the property checks ran on most swarms


def test_default_reads_four_of_six():
    config = SkipPipeConfig()
    assert (config.num_stages, config.visits_per_path) == (6, 4)
    assert SkipPipeConfig(num_stages=12).visits_per_path == 8
    assert SkipPipeConfig(skip_ratio=0.0).visits_per_path == 6
    assert SkipPipeConfig(num_stages=2).visits_per_path == 2


def uneven_swarm():
    """Six stages, one peer each; stage 3 is three times slower and stage 5 sits behind a
    slow link: the full pipeline queues behind both, SkipPipe routes around them."""
    peers = [PeerSpec("s0", 0, 1.0)] + [
        PeerSpec(f"s{s}", s, 3.0 if s == 3 else 1.0, memory_cap=4) for s in range(1, 6)
    ]
    delays = {("s4", "s5"): 1.0, ("s0", "s5"): 1.0}
    return peers, delays


def test_skippipe_beats_full_pipeline_on_uneven_swarm():
    peers, delays = uneven_swarm()
    config = SkipPipeConfig(num_stages=6, num_microbatches=12, transfer_s=0.1)  # skip 1/3
    skip, full = schedule(peers, config, delays), full_pipeline_schedule(peers, config, delays)
    check_schedule(skip, peers, delays, config, 4, 8)
    check_schedule(full, peers, delays, config, 6, None)
    ratio = skip.iteration_time_s / full.iteration_time_s
    print(
        f"skip 1/3 vs full: {skip.iteration_time_s:.1f}s / {full.iteration_time_s:.1f}s "
        f"= {ratio:.3f}"
    )
    assert ratio <= 0.8


def test_skippipe_beats_full_pipeline_on_random_replicated_swarms():
    rng = random.Random(7)
    ratios = []
    for _ in range(10):
        peers, delays = random_swarm(rng, 6)
        config = SkipPipeConfig(num_stages=6, num_microbatches=12)
        ratios.append(
            schedule(peers, config, delays).iteration_time_s
            / full_pipeline_schedule(peers, config, delays).iteration_time_s
        )
    print("random 6-stage swarms, skip/full:", [round(r, 3) for r in ratios])
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) <= 0.8


def test_slow_link_peer_is_avoided():
    peers = [PeerSpec("s0", 0, 1.0)] + [
        PeerSpec(f"s{s}{r}", s, 1.0) for s in range(1, 4) for r in "ab"
    ]
    delays = {("s0", "s2b"): 1000.0, ("s1a", "s2b"): 1000.0, ("s1b", "s2b"): 1000.0}
    plan = schedule(peers, SkipPipeConfig(num_stages=4, num_microbatches=6), delays)
    assert all(peer != "s2b" for path in plan.paths.values() for _, peer in path)


def test_memory_cap_one_serialises_a_peer():
    peers = [PeerSpec(f"s{s}", s, 1.0, memory_cap=1) for s in range(4)]
    config = SkipPipeConfig(num_stages=4, num_microbatches=4, stages_per_path=4)
    plan = schedule(peers, config)
    check_schedule(plan, peers, {}, config, 4, 4)
    single = 4 * 1.0 + 4 * 2.0  # four forwards, four backwards: each microbatch alone
    assert plan.iteration_time_s == pytest.approx(4 * single)
    unlimited = [PeerSpec(p.peer_id, p.stage_index, p.forward_s) for p in peers]
    assert schedule(unlimited, config).iteration_time_s < plan.iteration_time_s


@pytest.mark.parametrize(
    "peers, config, constraint",
    [
        ([PeerSpec("a", 1, 1.0)], SkipPipeConfig(num_stages=3, stages_per_path=2), "coverage"),
        (
            [PeerSpec("a", 0, 1.0), PeerSpec("b", 1, 1.0)],
            SkipPipeConfig(num_stages=3, stages_per_path=3),
            "coverage",
        ),
        (
            [PeerSpec(f"s{s}", s, 1.0) for s in range(6)],
            SkipPipeConfig(num_microbatches=4, stage_visit_cap=1),
            "visit_cap",
        ),
        (  # 0 -> a -> b -> loss(10) with jumps <= 3 needs a <= 3, b <= 6 and b >= 7
            [PeerSpec(f"s{s}", s, 1.0) for s in range(10)],
            SkipPipeConfig(num_stages=10, stages_per_path=3, max_jump=3, stage_visit_cap=8),
            "max_jump",
        ),
    ],
)
def test_infeasible_inputs_name_the_constraint(peers, config, constraint):
    with pytest.raises(ScheduleInfeasible) as info:
        schedule(peers, config)
    assert constraint in info.value.constraints
    assert isinstance(info.value, ValueError)


def test_default_visit_cap_is_raised_only_when_the_greedy_corners_itself():
    forward = [1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 1.0]
    peers = [PeerSpec(f"s{s}", s, f) for s, f in enumerate(forward)]
    config = SkipPipeConfig(num_stages=9, num_microbatches=10, stages_per_path=5)
    even = math.ceil(10 * 4 / 8)
    with pytest.raises(ScheduleInfeasible) as info:
        schedule(peers, dataclasses.replace(config, stage_visit_cap=even))
    assert "visit_cap" in info.value.constraints and info.value.microbatch is not None
    plan = schedule(peers, config)
    assert plan.stage_visit_cap == even + 1
    check_schedule(plan, peers, {}, config, 5, even + 1)
    uneven = schedule(*uneven_swarm()[:1], SkipPipeConfig(num_stages=6, num_microbatches=12))
    assert uneven.stage_visit_cap == math.ceil(12 * 3 / 5)  # the even spread when it works


def test_full_pipeline_needs_every_stage():
    peers = [PeerSpec("a", 0, 1.0), PeerSpec("c", 2, 1.0)]
    with pytest.raises(ScheduleInfeasible, match=r"stages \[1\]"):
        full_pipeline_schedule(peers, SkipPipeConfig(num_stages=3))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SkipPipeConfig(skip_ratio=1.0), "skip_ratio"),
        (lambda: SkipPipeConfig(stages_per_path=7), "stages_per_path"),
        (lambda: SkipPipeConfig(stages_per_path=1), "stages_per_path"),
        (lambda: SkipPipeConfig(num_microbatches=0), "num_microbatches"),
        (lambda: SkipPipeConfig(max_swaps=-1), "max_swaps"),
        (lambda: schedule([PeerSpec("a", 0, 1.0)] * 2, SkipPipeConfig()), "twice"),
        (lambda: schedule([PeerSpec("a", 6, 1.0)], SkipPipeConfig()), "stage_index"),
        (lambda: schedule([PeerSpec("a", 0, 0.0)], SkipPipeConfig()), "forward_s"),
        (lambda: schedule([PeerSpec("a", 0, 1.0, memory_cap=0)], SkipPipeConfig()), "memory_cap"),
        (
            lambda: schedule(
                [PeerSpec(f"s{s}", s, 1.0) for s in range(6)],
                SkipPipeConfig(),
                lambda a, b: -1.0,
            ),
            "link delay",
        ),
        (
            lambda: schedule([PeerSpec("a", 0, 1.0)], SkipPipeConfig(num_stages=2), [[0.0]] * 2),
            "matrix",
        ),
    ],
)
def test_bad_inputs_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_link_delay_forms_agree():
    rng = random.Random(3)
    peers, delays = random_swarm(rng, 5)
    ids = [p.peer_id for p in peers]
    matrix = [[delays.get((a, b), delays.get((b, a), 0.0)) for b in ids] for a in ids]
    config = SkipPipeConfig(num_stages=5, num_microbatches=6)
    by_map = schedule(peers, config, delays)
    by_matrix = schedule(peers, config, matrix)
    by_function = schedule(peers, config, lambda a, b: matrix[ids.index(a)][ids.index(b)])
    assert by_map == by_matrix == by_function


def test_deterministic_and_independent_of_peer_order():
    rng = random.Random(11)
    peers, delays = random_swarm(rng, 6)
    config = SkipPipeConfig(num_stages=6, num_microbatches=10)
    first = schedule(peers, config, delays)
    shuffled = list(peers)
    random.Random(5).shuffle(shuffled)
    assert schedule(peers, config, delays) == first
    assert schedule(shuffled, config, delays) == first


def test_recompute_after_a_peer_leaves():
    peers = [PeerSpec(f"s{s}{r}", s, 1.0 + 0.1 * s) for s in range(6) for r in "ab"]
    config = SkipPipeConfig(num_stages=6, num_microbatches=8)
    before = schedule(peers, config)
    assert any(peer == "s3a" for path in before.paths.values() for _, peer in path)
    after = schedule([p for p in peers if p.peer_id != "s3a"], config)
    assert all(peer != "s3a" for path in after.paths.values() for _, peer in path)
    check_schedule(after, [p for p in peers if p.peer_id != "s3a"], {}, config, 4, 5)


def test_kept_stages_are_on_every_path_and_the_rest_share_the_skips():
    peers, delays = uneven_swarm()
    peers = [
        dataclasses.replace(p, forward_s=4.0) if p.stage_index == 1 else p for p in peers
    ]  # slow, but kept
    config = SkipPipeConfig(num_stages=6, num_microbatches=12, always_visit=(1,))
    plan = schedule(peers, config, delays)
    check_schedule(plan, peers, delays, config, 4, plan.stage_visit_cap)
    assert all(path[1][0] == 1 for path in plan.paths.values())  # kept: never skipped nor swapped
    counts = Counter(stage for path in plan.paths.values() for stage, _ in path[1:-1])
    assert counts[1] == 12 and plan.stage_visit_cap == math.ceil(
        12 * 2 / 4
    )  # 2 free visits over stages 2..5
    assert sum(counts[s] for s in range(2, 6)) == 24
    both_ends = schedule(
        peers, dataclasses.replace(config, always_visit=(1, 5), max_swaps=0), delays
    )
    for path in both_ends.paths.values():
        inner = [stage for stage, _ in path[1:-1]]
        assert (inner[0], inner[-1]) == (1, 5) and len(inner) == 3


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SkipPipeConfig(always_visit=(0,)), "always_visit"),
        (lambda: SkipPipeConfig(always_visit=(6,)), "always_visit"),
        (lambda: SkipPipeConfig(always_visit=(2, 2)), "always_visit"),
        (lambda: SkipPipeConfig(always_visit=(1, 2, 3, 4)), "keeps 4 stages"),
    ],
)
def test_bad_kept_stages(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_visit_slack_lets_a_slow_stage_be_visited_less():
    speeds = {
        1: (20, 60),
        2: (20, 20),
        3: (60, 80),
        4: (20, 40),
        5: (30, 90),
    }  # scripts/bench_skippipe.py's, in ms
    peers = [PeerSpec("d", 0, 1e-6)] + [
        PeerSpec(f"s{s}{i}", s, ms / 1000)
        for s, pair in speeds.items()
        for i, ms in enumerate(pair)
    ]
    config = SkipPipeConfig(num_stages=6, num_microbatches=16, max_swaps=0, always_visit=(1,))
    even, slack = (
        schedule(peers, config),
        schedule(peers, dataclasses.replace(config, visit_slack=0.25)),
    )
    for plan, cap, floor in ((even, 8, 0), (slack, 10, 6)):
        assert (plan.stage_visit_cap, plan.stage_visit_floor) == (
            cap,
            floor,
        )  # 32 free visits over stages 2..5: 8 each, x1.25, x0.75
        check_schedule(plan, peers, {}, config, 4, cap)
    visits = [
        Counter(s for path in plan.paths.values() for s, _ in path[1:-1]) for plan in (even, slack)
    ]
    assert [visits[0][s] for s in range(2, 6)] == [
        8,
        8,
        8,
        8,
    ]  # the even share: no choice of stages left
    assert (
        6 <= visits[1][3] < 8 and slack.iteration_time_s < even.iteration_time_s
    )  # stage 3 (60/80 ms) visited less
    with pytest.raises(ValueError, match="visit_slack"):
        SkipPipeConfig(visit_slack=-0.1)


def test_unserved_kept_stage_is_infeasible():
    peers = [PeerSpec(f"s{s}", s, 1.0) for s in range(6) if s != 1]
    with pytest.raises(ScheduleInfeasible, match=r"kept stages \[1\]") as info:
        schedule(peers, SkipPipeConfig(always_visit=(1,)))
    assert info.value.constraints == ("coverage",)
    assert schedule(peers, SkipPipeConfig()).paths  # without the kept stage it plans
