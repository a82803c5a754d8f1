"""Routers (pipeline/routing.py): balance, determinism, bans and SWARM's load spreading,
all on a fake clock."""

from __future__ import annotations

import heapq
import json
from collections import Counter

import pytest

from shoal.pipeline.routing import (
    ROUTERS,
    NoRoute,
    RandomRouter,
    RoutingError,
    SwarmRouter,
    build_router,
)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


PEERS = ["a", "b", "c", "d", "e"]


def make(name: str, seed: int = 0, **options):
    clock = FakeClock()
    return build_router(name, seed, clock=clock, **options), clock


# --- RandomRouter -----------------------------------------------------------------------


def test_random_is_balanced_over_whole_cycles():
    router, _ = make("random", seed=3)
    k = 7
    counts = Counter(router.choose(0, PEERS, microbatch=m) for m in range(k * len(PEERS)))
    assert counts == {p: k for p in PEERS}
    # Every window of n consecutive microbatches is a permutation, not just the total.
    router, _ = make("random", seed=4)
    picks = [router.choose(1, PEERS, microbatch=m) for m in range(3 * len(PEERS))]
    for start in range(0, len(picks), len(PEERS)):
        assert sorted(picks[start : start + len(PEERS)]) == PEERS


def test_random_is_shuffled_not_round_robin():
    router, _ = make("random", seed=0)
    cycles = {
        tuple(router.choose(0, PEERS, microbatch=m) for m in range(c * 5, c * 5 + 5))
        for c in range(6)
    }
    assert len(cycles) > 1


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_same_seed_same_routes_and_order_of_candidates_does_not_matter(name):
    def run(seed: int, reverse: bool) -> list[str]:
        router, clock = make(name, seed=seed)
        picks = []
        for m in range(40):
            clock.now = m * 0.25
            peers = PEERS[::-1] if reverse else PEERS
            peer = router.choose(m % 3, peers, microbatch=m, backward=m % 4 == 0)
            picks.append(peer)
            if m % 2:
                router.report(peer, seconds=0.1 + (m % 5) * 0.05, task_size=1.0)
        return picks

    assert run(11, False) == run(11, False) == run(11, True)
    assert run(11, False) != run(12, False)


def test_random_repeat_of_a_microbatch_keeps_its_peer_and_takes_no_slot():
    router, _ = make("random", seed=5)
    forward = [router.choose(0, PEERS, microbatch=m) for m in range(len(PEERS))]
    backward = [router.choose(0, PEERS, microbatch=m, backward=True) for m in range(len(PEERS))]
    assert backward == forward
    # The repeats consumed no slot: the next n microbatches are again one full permutation.
    assert sorted(router.choose(0, PEERS, microbatch=m) for m in range(5, 10)) == PEERS


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_a_planned_peer_is_taken_unless_banned_or_absent(name):
    router, clock = make(name)
    assert all(router.choose(0, PEERS, microbatch=m, prefer="d") == "d" for m in range(10))
    router.failed("d")
    assert router.choose(0, PEERS, microbatch=11, prefer="d") != "d"
    assert router.choose(0, PEERS, microbatch=12, prefer="zz") in PEERS


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_retry_avoids_the_failed_peer(name):
    router, clock = make(name, seed=2)
    first = router.choose(0, PEERS, microbatch=7)
    clock.now = 0.5
    router.failed(first)
    retry = router.choose(0, PEERS, microbatch=7)
    assert retry != first
    assert router.choose(0, PEERS, microbatch=7, backward=True) == retry  # follows the retry
    # While banned, no new microbatch goes there either.
    assert first not in {router.choose(0, PEERS, microbatch=m) for m in range(100, 140)}


def test_random_skipped_peer_keeps_its_turn_after_ban():
    router, clock = make("random", seed=1, ban_s=5.0)
    router.failed("c")
    picks = [router.choose(0, PEERS, microbatch=m) for m in range(8)]
    assert "c" not in picks and Counter(picks)["a"] >= 1
    clock.now = 6.0  # ban over: "c" is back in rotation
    assert "c" in {router.choose(0, PEERS, microbatch=m) for m in range(100, 105)}


# --- bans (shared helper) -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_all_banned_still_returns_the_soonest_unbanned(name):
    router, clock = make(name)
    router.failed("a")  # banned until 10
    router.failed("b")
    clock.now = 1.0
    router.failed("b")  # second strike: banned until 1 + 20
    router.failed("c")  # banned until 11
    clock.now = 2.0
    assert router.choose(0, ["b", "c", "a"], microbatch=0) == "a"
    assert router.choose(0, ["b", "c"], microbatch=1) == "c"


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_ban_doubles_caps_resets_and_expires_on_the_clock(name):
    router, clock = make(name, ban_s=10.0, max_ban_s=35.0)

    def ban_of(peer: str) -> float:
        return router.snapshot()["peers"][peer]["banned_for_s"]

    lengths = []
    for _ in range(4):
        router.failed("a")
        lengths.append(ban_of("a"))
        clock.now += ban_of("a") + 0.5  # let it expire each time
    assert lengths == [10.0, 20.0, 35.0, 35.0]

    assert router.choose(0, ["a", "b"], microbatch=0) in {"a", "b"}
    router.failed("a")
    for m in range(1, 20):
        assert router.choose(0, ["a", "b"], microbatch=m) == "b"
    router.report("a", seconds=1.0, task_size=1.0)  # a success resets the count...
    assert ban_of("a") > 0  # ...but the running ban is served out
    clock.now += 35.5
    assert "a" in {router.choose(0, ["a", "b"], microbatch=m) for m in range(100, 110)}
    router.failed("a")
    assert ban_of("a") == 10.0
    snap = router.snapshot()["peers"]["a"]
    assert snap["tasks_failed"] == 6 and snap["tasks_done"] == 1


# --- SwarmRouter ---------------------------------------------------------------------------


def simulate(
    router: SwarmRouter,
    clock: FakeClock,
    speed: dict[str, float],
    *,
    tasks: int,
    in_flight: int = 4,
    start_mb: int = 0,
) -> Counter:
    """Closed loop: keep `in_flight` microbatches going; each peer works through its queue
    serially at `speed` task units per second and reports on completion."""
    free_at = dict.fromkeys(speed, clock.now)
    events: list[tuple[float, int, str]] = []
    counts: Counter = Counter()
    for m in range(start_mb, start_mb + tasks):
        if len(events) >= in_flight:
            done_at, _, peer = heapq.heappop(events)
            clock.now = max(clock.now, done_at)
            router.report(peer, seconds=1.0 / speed[peer], task_size=1.0)
        peer = router.choose(0, sorted(speed), microbatch=m)
        counts[peer] += 1
        free_at[peer] = max(clock.now, free_at[peer]) + 1.0 / speed[peer]
        heapq.heappush(events, (free_at[peer], m, peer))
    while events:
        done_at, _, peer = heapq.heappop(events)
        clock.now = max(clock.now, done_at)
        router.report(peer, seconds=1.0 / speed[peer], task_size=1.0)
    return counts


def test_swarm_sends_most_traffic_to_a_4x_faster_peer():
    router, clock = make("swarm", seed=0)
    speed = {"fast": 4.0, "slow": 1.0}
    simulate(router, clock, speed, tasks=20)  # warm-up
    counts = simulate(router, clock, speed, tasks=200, start_mb=20)
    share = counts["fast"] / sum(counts.values())
    assert 0.7 <= share <= 0.9, counts  # ideal 4 / (4 + 1) = 0.8
    throughput = {p: s["throughput"] for p, s in router.snapshot()["peers"].items()}
    assert throughput["fast"] == pytest.approx(4.0) and throughput["slow"] == pytest.approx(1.0)


def test_random_router_ignores_speed():
    router, clock = make("random", seed=0)
    counts = simulate(router, clock, {"fast": 4.0, "slow": 1.0}, tasks=200)
    assert counts["fast"] == counts["slow"] == 100


def test_swarm_tries_a_new_peer_soon_after_it_appears():
    router, clock = make("swarm", seed=0)
    simulate(router, clock, {"a": 2.0, "b": 2.0}, tasks=40)
    first_picks = [router.choose(0, ["a", "b", "new"], microbatch=1000 + m) for m in range(2)]
    assert "new" in first_picks
    # ...without being flooded: it is not chosen for every task before it reports.
    more = [router.choose(0, ["a", "b", "new"], microbatch=2000 + m) for m in range(6)]
    assert set(more) == {"a", "b", "new"}


def test_swarm_spreads_unmeasured_peers():
    router, _ = make("swarm", seed=9)
    picks = [router.choose(0, PEERS, microbatch=m) for m in range(len(PEERS))]
    assert sorted(picks) == PEERS


def test_swarm_backward_costs_2_5x_in_the_busy_projection():
    router, clock = make("swarm")
    clock.now = 100.0
    router.report("p", seconds=0.5, task_size=1.0)  # 2 units/s
    router.report("q", seconds=0.5, task_size=1.0)
    assert router.choose(0, ["p"], microbatch=0, task_size=1.0) == "p"
    assert router.choose(0, ["q"], microbatch=1, task_size=1.0, backward=True) == "q"
    peers = router.snapshot()["peers"]
    assert peers["p"]["busy_for_s"] == pytest.approx(0.5)
    assert peers["q"]["busy_for_s"] == pytest.approx(1.25)
    # The projection stacks: a second task on p ends after the first.
    router.choose(0, ["p"], microbatch=2, task_size=2.0)
    assert router.snapshot()["peers"]["p"]["busy_for_s"] == pytest.approx(1.5)
    # A report settles the work it finished; a backward report measures 2.5 units per task.
    clock.now = 101.0
    router.report("q", seconds=1.25, task_size=1.0, backward=True)
    peers = router.snapshot()["peers"]
    assert peers["q"]["busy_for_s"] == 0.0
    assert peers["q"]["throughput"] == pytest.approx(2.0)


def test_swarm_backward_follows_its_forward_peer():
    router, clock = make("swarm", seed=1)
    forward = {m: router.choose(2, PEERS, microbatch=m) for m in range(10)}
    for m in range(10):
        assert router.choose(2, PEERS, microbatch=m, backward=True) == forward[m]


# --- errors, registry, snapshot -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_no_route_on_empty_candidates(name):
    router, _ = make(name)
    with pytest.raises(NoRoute, match="stage 3"):
        router.choose(3, [], microbatch=0)
    assert issubclass(NoRoute, RoutingError)


def test_build_router_names_and_options():
    assert isinstance(build_router("random", 0), RandomRouter)
    assert isinstance(build_router("swarm", 0, ema_alpha=0.5), SwarmRouter)
    with pytest.raises(ValueError, match=r"'random', 'swarm'"):
        build_router("fastest", 0)
    with pytest.raises(ValueError, match="ban_seconds"):
        build_router("swarm", 0, ban_seconds=3)
    with pytest.raises(ValueError, match="ema_alpha"):
        build_router("swarm", 0, ema_alpha=0.0)
    router, _ = make("swarm")
    with pytest.raises(ValueError, match="seconds"):
        router.report("a", seconds=-1.0, task_size=1.0)
    with pytest.raises(ValueError, match="task_size"):
        router.choose(0, PEERS, microbatch=0, task_size=0.0)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_snapshot_is_json_and_stale_peers_are_forgotten(name):
    router, clock = make(name, forget_after_s=60.0)
    peer = router.choose(0, ["a", "b"], microbatch=0)
    router.report(peer, seconds=0.5, task_size=1.0)
    snap = json.loads(json.dumps(router.snapshot()))
    assert snap["router"] == name and set(snap["peers"]) == {"a", "b"}
    assert snap["peers"][peer]["tasks_done"] == 1 and snap["peers"][peer]["throughput"] == 2.0
    clock.now = 100.0
    router.choose(0, ["b", "c"], microbatch=1)
    assert set(router.snapshot()["peers"]) == {"b", "c"}
