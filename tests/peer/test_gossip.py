"""Digest-and-delta gossip (`peer.gossip`): exchanges over msgpack between in-memory
memberships, the revision rules of `Membership.take`, strict validation, and the
--min-peers start barrier."""

import asyncio
import random
from types import SimpleNamespace

import msgpack
import pytest

from shoal.peer.agent import MembershipAgent
from shoal.peer.config import ProtocolConfig
from shoal.peer.errors import ProtocolError, ShoalError
from shoal.peer.gossip import MAX_DELTAS, STANDBY_ROUND, Gossip, barrier_open
from shoal.peer.holders import NEVER
from shoal.peer.membership import MAX_ENTRIES, Membership, PeerInfo


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def wire(message):
    return msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False)


def size(message):
    return len(msgpack.packb(message, use_bin_type=True))


def node(pid, clock, **kw):
    me = PeerInfo(pid, f"http://{pid}:1", incarnation=1.0, **kw)
    m = Membership(me, suspect_after_s=3, dead_after_s=6, forget_after_s=60, clock=clock)
    return Gossip(m, random.Random(pid))


def exchange(a, b):
    """One exchange as `MembershipAgent.gossip_with` runs it, every message through msgpack;
    returns the bytes that crossed."""
    request = wire(a.request())
    answer = wire(b.answer(request))
    crossed = size(request) + size(answer)
    push = a.take_answer(answer, request)
    if push is not None:
        crossed += size(push) + size(b.answer(wire(push)))
    return crossed


def versions(g):
    return {pid: (p.incarnation, p.heartbeat, p.revision) for pid, p in g.membership.peers.items()}


def test_exchanges_converge_and_spread_a_join_both_ways():
    clock = Clock()
    nodes = [node(f"p{i}", clock) for i in range(12)]
    for g in nodes[1:]:  # everyone joined through p0, which alone knows them all
        g.membership.merge(wire(nodes[0].membership.table()))
        nodes[0].membership.merge([g.membership.me.to_wire()])
    rng = random.Random(0)
    for _ in range(8):
        clock.t += 1.0
        for g in nodes:
            g.membership.beat()
            for other in rng.sample([n for n in nodes if n is not g], 2):
                exchange(g, other)
    for g in nodes:  # everyone knows everyone, alive; heartbeats at most a beat behind
        assert set(g.membership.peers) == {n.membership.me.peer_id for n in nodes}
        assert all(g.membership.status(pid) == "alive" for pid in g.membership.peers)
        for n in nodes:
            me = n.membership.me
            assert me.heartbeat - g.membership.peers[me.peer_id].heartbeat <= 2
    # a newcomer known to one peer only: pushed when that peer initiates ...
    late = node("late", clock)
    nodes[3].membership.merge([late.membership.me.to_wire()])
    exchange(nodes[3], nodes[4])
    assert "late" in nodes[4].membership.peers
    # ... and pulled when a peer that lacks it initiates
    exchange(nodes[5], nodes[3])
    assert "late" in nodes[5].membership.peers


def test_a_heartbeat_costs_a_counter_and_a_change_a_full_entry():
    clock = Clock()
    a, b = node("a", clock), node("b", clock)
    exchange(a, b)
    clock.t = 1.0
    b.membership.beat()
    request = wire(a.request())
    answer = wire(b.answer(request))
    assert answer["peers"] == [] and answer["beats"] == {"b": 1}  # a bare counter
    a.take_answer(answer, request)
    assert a.membership.peers["b"].heartbeat == 1 and a.membership.quiet_for("b") == 0
    b.membership.me.round, b.membership.me.eval_loss = 3, 2.5
    clock.t = 2.0
    b.membership.beat()  # content changed: a new revision
    answer = wire(b.answer(wire(a.request())))
    assert [e["round"] for e in answer["peers"]] == [3] and answer["beats"] == {}
    a.take_answer(answer, wire(a.request()))
    assert a.membership.peers["b"].round == 3 and a.membership.history["b"][3]["eval_loss"] == 2.5


def test_traffic_counters_alone_are_revised_at_most_every_counters_period():
    clock = Clock()
    g = node("a", clock)
    me = g.membership.me
    period = g.membership.counters_every_s()
    assert period == 10.0
    for t in range(1, 12):
        clock.t = float(t)
        me.bytes_sent += 1000
        g.membership.beat()
        assert me.revision == (0 if t < period else 1), t
    me.phase = "ready"
    g.membership.revise()  # anything else: at once
    assert me.revision == 2


def test_an_old_copy_never_overwrites_a_newer_one():
    clock = Clock()
    g = node("me", clock)
    m = g.membership
    new = PeerInfo("x", "http://x:1", incarnation=1.0, heartbeat=5, revision=3, round=7)
    m.take([new])
    # older revision, newer heartbeat (it travelled alone since): liveness only
    clock.t = 2.0
    m.merge([PeerInfo("x", "http://x:1", incarnation=1.0, heartbeat=9, revision=2).to_wire()])
    assert m.peers["x"].round == 7 and m.peers["x"].heartbeat == 9 and m.quiet_for("x") == 0
    # newer revision, older heartbeat: content only, the heartbeat does not go back
    clock.t = 4.0
    m.merge([PeerInfo("x", "http://x:1", incarnation=1.0, heartbeat=8, revision=4).to_wire()])
    assert m.peers["x"].revision == 4 and m.peers["x"].heartbeat == 9 and m.quiet_for("x") == 2
    # an older incarnation, whatever its counters; a digest's stale heartbeat
    m.merge([PeerInfo("x", "http://x:9", incarnation=0.5, heartbeat=99, revision=99).to_wire()])
    g.answer({"digest": {"x": [1.0, 3, 1]}})
    assert versions(g)["x"] == (1.0, 9, 4) and m.peers["x"].address == "http://x:1"
    # and nobody speaks for us, in entries or digests
    answer = g.answer(
        {"digest": {"me": [9.0, 99, 99]}, "peers": [{**new.to_wire(), "peer_id": "me"}]}
    )
    assert answer["want"] == [] and versions(g)["me"] == (1.0, 0, 0)


@pytest.mark.parametrize(
    "message",
    [
        {"digest": {f"p{i}": [1.0, 1, 0] for i in range(MAX_ENTRIES + 1)}},
        {"peers": [PeerInfo(f"p{i}", "http://p:1").to_wire() for i in range(MAX_DELTAS + 1)]},
        {"digest": {"x": [1.0, 1]}},
        {"digest": {"x": [float("nan"), 1, 0]}},
        {"digest": {"x": [1.0, -1, 0]}},
        {"digest": {"x": [1.0, True, 0]}},
        {"digest": {"x": [1.0, 2**63, 0]}},
        {"digest": {"x" * 129: [1.0, 1, 0]}},
        {"digest": {"x": "1,1,0"}},
        {"digest": [["x", 1.0, 1, 0]]},
        {"digest": {"x": [1.0, 1, 0]}, "peers": [{"peer_id": "y"}]},
        {"peers": [PeerInfo("y", "http://y:1", phase="asleep").to_wire()]},
        "not a map",
    ],
)
def test_a_forged_or_oversized_message_is_refused_whole(message):
    clock = Clock()
    g = node("me", clock)
    if isinstance(message, dict):  # with something valid that must not be taken either
        message = {"peers": [PeerInfo("ok", "http://ok:1").to_wire()], **message}
    before = versions(g)
    with pytest.raises(ProtocolError):
        g.answer(wire(message))
    assert versions(g) == before


@pytest.mark.parametrize(
    "answer",
    [
        {"beats": {"x": -1}},
        {"beats": {"x": 1.5}},
        {"want": ["x"] * (MAX_ENTRIES + 1)},
        {"want": [7]},
        {"peers": [{"peer_id": "y", "address": "ftp://y"}]},
    ],
)
def test_a_malformed_answer_changes_nothing(answer):
    clock = Clock()
    g = node("me", clock)
    g.membership.take([PeerInfo("x", "http://x:1", incarnation=1.0, heartbeat=1)])
    request = g.request()
    with pytest.raises(ProtocolError):
        g.take_answer(
            {"peers": [PeerInfo("new", "http://n:1").to_wire()], "beats": {"x": 5}, **answer},
            request,
        )
    assert versions(g) == {"me": (1.0, 0, 0), "x": (1.0, 1, 0)}


def test_deltas_are_bounded_and_the_rest_follow_in_later_exchanges():
    clock = Clock()
    full, empty = node("full", clock), node("empty", clock)
    full.membership.take(
        [PeerInfo(f"p{i:03d}", f"http://p{i}:1", incarnation=1.0) for i in range(MAX_DELTAS + 40)]
    )
    answer = full.answer(wire(empty.request()))
    assert len(answer["peers"]) == MAX_DELTAS
    empty.take_answer(wire(answer), empty.request())
    exchange(empty, full)
    assert set(empty.membership.peers) == set(full.membership.peers) | {"empty"}


def test_the_barrier_counts_ready_peers_not_joins():
    clock = Clock()
    m = node("me", clock).membership
    m.me.phase = "ready"
    m.take([PeerInfo(p, f"http://{p}:1", incarnation=1.0) for p in ("a", "b")])
    assert not barrier_open(m, 3)  # joined, still building: the old barrier opened here
    m.take([PeerInfo("a", "http://a:1", incarnation=1.0, revision=1, phase="ready")])
    assert not barrier_open(m, 3) and barrier_open(m, 2)
    m.take([PeerInfo("b", "http://b:1", incarnation=1.0, revision=1, phase="ready")])
    assert barrier_open(m, 3)
    clock.t = 7.0  # a and b died: their readiness no longer counts
    m.beat()
    assert not barrier_open(m, 2)
    # a run already started opens it whatever the count: a peer training, or past round 0
    m.take([PeerInfo("c", "http://c:1", incarnation=1.0, phase="training")])
    assert barrier_open(m, 5)
    m.take([PeerInfo("d", "http://d:1", incarnation=2.0, round=4)])
    m.peers["c"].phase = None
    assert barrier_open(m, 5)


def test_a_standby_counts_as_ready_from_its_join_on():
    m = node("me", Clock()).membership
    m.me.phase = "ready"
    m.take([PeerInfo("s", "http://s:1", incarnation=1.0, first_round=NEVER)])
    assert barrier_open(m, 2) and not barrier_open(m, 3) and STANDBY_ROUND == NEVER


# no identity, no entry check: this test hands the membership unsigned entries directly
UNSIGNED_WIRE = SimpleNamespace(identity=None, keybook=SimpleNamespace(check_entry=None))


def test_the_agent_waits_at_the_barrier_until_enough_peers_are_ready():
    me = PeerInfo("me", "http://me:1", incarnation=1.0)
    agent = MembershipAgent(me, None, ProtocolConfig(), None, UNSIGNED_WIRE, None, lambda: 0)

    async def scenario():
        waiting = asyncio.create_task(agent.wait_for_peers(2, timeout_s=10))
        await asyncio.sleep(0.3)
        assert not waiting.done() and me.phase == "ready" and me.revision == 1
        agent.membership.take([PeerInfo("b", "http://b:1", incarnation=1.0)])
        await asyncio.sleep(0.3)
        assert not waiting.done()  # joined is not ready
        agent.membership.take(
            [PeerInfo("b", "http://b:1", incarnation=1.0, revision=1, phase="ready")]
        )
        await asyncio.wait_for(waiting, 2)
        assert me.phase == "training" and me.revision == 2
        with pytest.raises(ShoalError, match="only 1 of the 3 peers"):
            lonely = MembershipAgent(
                PeerInfo("l", "http://l:1"),
                None,
                ProtocolConfig(),
                None,
                UNSIGNED_WIRE,
                None,
                lambda: 0,
            )
            await lonely.wait_for_peers(3, timeout_s=0.3)

    asyncio.run(asyncio.wait_for(scenario(), 10))
