"""scripts/bench_scale.py's accounting, from synthetic peer reports: kinds fall into the right
class (unknown kinds into "other"), rounds after the first are measured from the cumulative
counters, the non-contribution rest is split by the run's shares, and peers are averaged."""

from __future__ import annotations

import pytest
from script_loader import load_script

from shoal.peer.reduce import PSEUDO_GRADIENT_KINDS

bench_scale = load_script("bench_scale")


def report(cumulative: list[tuple[int, int, float]], by_kind: dict[str, int]) -> dict:
    """A peer report: per round (bytes_sent, contribution_bytes_sent, time), cumulative."""
    return {
        "bytes_sent_by_kind": by_kind,
        "rounds": [
            {"bytes_sent": b, "contribution_bytes_sent": c, "time": t, "applied": ["a", "b"]}
            for b, c, t in cumulative
        ],
    }


def test_kinds_fall_into_classes():
    assert set(bench_scale.CONTRIBUTION_KINDS) == set(PSEUDO_GRADIENT_KINDS)
    assert bench_scale.by_class(
        {
            "contribution": 5,
            "shard": 7,
            "reduced": 11,
            "gossip": 3,
            "chunk": 2,
            "manifest": 1,
            "set": 4,
            "hash": 6,
            "something-new": 10,
        }  # fmt: skip
    ) == {"contributions": 23, "gossip": 3, "state": 3, "other": 20}


def test_rounds_after_the_first_split_by_run_shares():
    # run: gossip 300, state 100, other 100 -> the rest of a round is 60/20/20
    peer = report(
        [(1_000, 800, 10.0), (2_000, 1_500, 12.0), (3_500, 2_800, 15.0)],
        {"contribution": 2_800, "gossip": 300, "chunk": 100, "join": 100},
    )
    rows = bench_scale.peer_rounds(peer)
    assert len(rows) == 2  # round 1 (start-up) is not measured
    assert rows[0] == pytest.approx(
        {
            "total": 1_000,
            "contributions": 700,
            "gossip": 180,
            "state": 60,
            "other": 60,
            "seconds": 2.0,
        }  # fmt: skip
    )
    assert rows[1]["total"] == 1_500 and rows[1]["contributions"] == 1_300
    assert rows[1]["gossip"] + rows[1]["state"] + rows[1]["other"] == pytest.approx(200)
    assert rows[1]["seconds"] == pytest.approx(3.0)


def test_swarm_row_means_and_max_over_peers():
    a = report([(0, 0, 0.0), (1_000, 1_000, 1.0), (3_000, 3_000, 2.0)], {"contribution": 3_000})
    b = report([(0, 0, 0.0), (4_000, 3_000, 5.0), (8_000, 6_000, 9.0)], {"gossip": 1})
    row = bench_scale.swarm_row([a, b])
    # peer a: 1500 per round (all contributions); peer b: 4000 per round, 1000 of it gossip
    assert row["bytes_per_round_mean"]["total"] == pytest.approx(2_750)
    assert row["bytes_per_round_max"]["total"] == pytest.approx(4_000)
    assert row["bytes_per_round_mean"]["contributions"] == pytest.approx(2_250)
    assert row["bytes_per_round_mean"]["gossip"] == pytest.approx(500)
    assert row["round_seconds_median"] == pytest.approx(2.5)  # of 1, 1, 5, 4
    assert row["rounds_measured"] == 2
    rows = [{"peers": 8, "bytes_per_round_mean": {"total": 300.0}},
            {"peers": 4, "bytes_per_round_mean": {"total": 100.0}}]  # fmt: skip
    bench_scale.add_ratios(rows)
    assert [r["bytes_vs_smallest_n"] for r in rows] == [3.0, 1.0]


def test_one_round_is_not_enough():
    with pytest.raises(ValueError, match="two rounds"):
        bench_scale.swarm_row([report([(10, 5, 1.0)], {"contribution": 5})])
