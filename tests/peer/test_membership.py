import pytest

from shoal.peer.errors import ProtocolError
from shoal.peer.membership import Membership, PeerInfo


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def entry(pid, hb=1, inc=1.0, **kw):
    return PeerInfo(
        pid, f"http://127.0.0.1:{1000 + len(pid)}", incarnation=inc, heartbeat=hb, **kw
    ).to_wire()


def make(clock=None):
    return Membership(
        PeerInfo("me", "http://127.0.0.1:1"),
        suspect_after_s=3,
        dead_after_s=6,
        forget_after_s=60,
        clock=clock or Clock(),
    )


def test_merge_takes_newer_entries_only():
    m = make()
    assert m.merge([entry("a", hb=5, round=2)]) == 1
    assert m.merge([entry("a", hb=4, round=1)]) == 0
    assert m.peers["a"].round == 2
    assert m.merge([entry("a", hb=1, inc=2.0, round=0)]) == 1  # restarted: new incarnation wins
    assert m.peers["a"].round == 0


def test_nobody_speaks_for_us():
    m = make()
    m.merge([entry("me", hb=99, round=50)])
    assert m.me.round == 0


@pytest.mark.parametrize(
    "bad",
    [
        "not a list",
        [{"peer_id": "x"}],
        [entry("x", round=-1)],
        [{**entry("x"), "address": "ftp://x"}],
        [{**entry("x"), "eval_loss": float("nan")}],
        [{**entry("x"), "unknown": 1}],
        [entry("ok"), {**entry("bad"), "heartbeat": "1"}],
    ],
)
def test_malformed_tables_change_nothing(bad):
    m = make()
    with pytest.raises(ProtocolError):
        m.merge(bad)
    assert set(m.peers) == {"me"}


def test_failure_detection_timeline():
    """SWIM: silence is no evidence; a suspicion is, for a window; then dead."""
    clock = Clock()
    m = make(clock)
    m.merge([entry("a", hb=1)])
    assert m.status("a") == "alive" and [p.peer_id for p in m.live_others()] == ["a"]
    clock.t = 100.0
    assert m.status("a") == "alive"  # quiet for long: nobody said anything against it
    assert m.suspect("a") and not m.suspect("a")  # news once
    assert m.status("a") == "suspect" and m.is_alive("a")
    m.merge([entry("a", hb=2)])  # a refutation: a larger heartbeat
    assert m.status("a") == "alive"
    assert not m.suspect("a", heartbeat=1)  # stale: the refutation passed it
    assert m.suspect("a")
    clock.t += 2.9
    assert m.status("a") == "suspect"
    clock.t += 0.1  # dead_after_s - suspect_after_s = 3 s unrefuted
    assert (
        m.status("a") == "dead"
        and m.live_others() == []
        and all(e["peer_id"] != "a" for e in m.table())
    )
    clock.t += 600.0
    m.merge([])
    assert "a" not in m.peers
    m.merge([entry("b", hb=0)])
    m.suspect("b")
    m.touch("b")  # it answered us: alive here at once
    assert m.status("b") == "alive"


def test_history_records_losses_per_round():
    m = make()
    m.merge([entry("a", hb=1, round=1, eval_loss=3.0)])
    m.merge([entry("a", hb=2, round=2, eval_loss=2.5, partner_distance=0.01)])
    assert m.history["a"] == {
        1: {"eval_loss": 3.0, "train_loss": None, "partner_distance": None},
        2: {"eval_loss": 2.5, "train_loss": None, "partner_distance": 0.01},
    }


def test_dead_peers_are_probed_and_revive_on_a_newer_heartbeat():
    """Peers that all stalled at once see each other dead; a probe of a dead peer is how
    they find each other again (gossip targets only live peers)."""
    import random

    clock = Clock()
    m = make(clock)
    m.merge([entry("a", hb=1), entry("b", hb=1)])
    assert m.probe_target(random.Random(0)) is None  # nobody dead: nothing to probe
    m.declare_dead("a")
    m.declare_dead("b")
    assert m.live_others() == [] and m.gossip_targets(3, random.Random(0)) == []
    assert m.probe_target(random.Random(0)).peer_id in ("a", "b")
    m.merge([entry("a", hb=2)])  # the probe's answer carries a newer heartbeat
    assert m.status("a") == "alive" and m.probe_target(random.Random(0)).peer_id == "b"
    clock.t = 700.0
    m.merge([])
    assert m.probe_target(random.Random(0)) is None  # forgotten peers are not probed


def test_a_peer_that_failed_a_probe_is_declared_dead_until_it_speaks_again():
    clock = Clock()
    m = make(clock)
    m.merge([entry("a", hb=1, grad_norm=0.5)])
    clock.t = 1.6
    assert m.quiet_for("a") == pytest.approx(1.6) and m.quiet_for("nobody") == float("inf")
    m.declare_dead("a")
    m.declare_dead("me")  # never ourselves
    assert m.status("a") == "dead" and m.live_others() == [] and m.status("me") == "alive"
    m.merge([entry("a", hb=1)])  # old news does not revive it
    assert m.status("a") == "dead"
    m.merge([entry("a", hb=2)])
    assert m.status("a") == "alive" and m.peers["a"].grad_norm is None
    with pytest.raises(ProtocolError):
        m.merge([entry("b", grad_norm=float("nan"))])
