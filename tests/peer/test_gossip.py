"""SWIM-style gossip (`peer.gossip`): exchanges over msgpack between in-memory
memberships, news and suspicion events, anti-entropy, the revision rules of
`Membership.take`, strict validation, and the --min-peers start barrier."""

import asyncio
import random
from dataclasses import replace
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


def exchange(a, b, full=False):
    """One exchange as `MembershipAgent.gossip_with` runs it (followed by a digest
    exchange when the table sums differ), every message through msgpack; returns the
    bytes that crossed."""
    request = wire(a.request(full=full))
    answer = wire(b.answer(request))
    crossed = size(request) + size(answer)
    push = a.take_answer(answer, request)
    if push is not None:
        final = wire(b.answer(wire(push)))
        a.take_entries(final)
        crossed += size(push) + size(final)
    if a.sum_differs and not full:
        crossed += exchange(a, b, full=True)
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
    for _ in range(4):
        clock.t += 1.0
        for g in nodes:
            g.membership.beat()
            exchange(g, rng.choice([n for n in nodes if n is not g]))
    for g in nodes:  # everyone knows everyone, alive, with the same table
        assert set(g.membership.peers) == {n.membership.me.peer_id for n in nodes}
        assert all(g.membership.status(pid) == "alive" for pid in g.membership.peers)
        assert g.membership.table_sum() == nodes[0].membership.table_sum()
    # a newcomer known to one peer only: pushed when that peer initiates ...
    late = node("late", clock)
    nodes[3].membership.merge([late.membership.me.to_wire()])
    exchange(nodes[3], nodes[4])
    assert "late" in nodes[4].membership.peers
    # ... and pulled when a peer that lacks it initiates
    exchange(nodes[5], nodes[3])
    assert "late" in nodes[5].membership.peers


def quiet(nodes, rounds=20):
    """Exchange until every piece of news has been repeated its last time."""
    for _ in range(rounds):
        for g in nodes:
            for other in nodes:
                if other is not g:
                    exchange(g, other)


def test_a_quiet_swarm_costs_the_same_whatever_its_size_and_a_change_one_entry():
    clock = Clock()
    sizes = {}
    for n in (3, 40):
        nodes = [node(f"p{i:02d}", clock) for i in range(n)]
        for g in nodes:
            g.membership.take([replace(o.membership.me) for o in nodes if o is not g])
        quiet(nodes[:3], rounds=8)
        for g in nodes:
            g.membership.changed.clear()
            g.hot_news.clear()
        sizes[n] = exchange(nodes[0], nodes[1])
    assert sizes[3] == sizes[40] < 200, sizes  # a probe and its answer: news of nothing
    a, b = nodes[0], nodes[1]
    b.membership.me.round, b.membership.me.eval_loss = 3, 2.5
    clock.t = 2.0
    b.membership.beat()  # progress alone: revised only every counters_every_s()
    assert b.membership.me.revision == 0
    b.membership.me.phase = "training"
    b.membership.beat()  # content changed: a new revision, news for b's next messages
    request = wire(b.request())
    assert request["news"] == {"p01": [1.0, 0, 1]}
    answer = wire(a.answer(request))
    assert answer["want"] == ["p01"]
    final = wire(a.answer(wire(b.take_answer(answer, request))))
    assert final == {"peers": []}  # a had nothing b wanted; b's entry went in the push
    assert a.membership.peers["p01"].round == 3
    assert a.membership.history["p01"][3]["eval_loss"] == 2.5


def test_a_suspicion_spreads_and_its_target_refutes_it():
    clock = Clock()
    a, b, c = (node(p, clock) for p in "abc")
    for g in (a, b, c):
        g.membership.take([replace(o.membership.me) for o in (a, b, c) if o is not g])
    assert a.membership.suspect("c") and a.membership.status("c") == "suspect"
    a.spread("c", "suspect")
    exchange(a, b)  # b hears of it: suspect at b too, and b will spread it on
    assert b.membership.status("c") == "suspect" and b.fresh and "c" in b.hot_events
    clock.t = 2.9
    assert b.membership.status("c") == "suspect"  # the window: dead_after_s - suspect_after_s
    exchange(b, c)  # c hears it is suspected: it refutes, with a larger heartbeat
    assert c.membership.me.heartbeat == 1 and c.hot_events["c"][0] == ["c", 1.0, 1, "alive"]
    exchange(c, a)
    assert a.membership.status("c") == "alive" and a.membership.peers["c"].heartbeat == 1
    # a stale suspicion (an older heartbeat) changes nothing now
    assert not a.membership.suspect("c", heartbeat=0)
    exchange(a, b)
    assert b.membership.status("c") == "alive"
    # unrefuted, a suspicion ends in death after the window
    assert b.membership.suspect("a")
    clock.t += 3.0
    assert b.membership.status("a") == "dead" and "a" not in b.membership.digest()


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
    g.answer({"digest": {"x": [1.0, 3, 1]}, "sum": b""})
    assert versions(g)["x"] == (1.0, 9, 4) and m.peers["x"].address == "http://x:1"
    # and nobody speaks for us, in entries or digests
    answer = g.answer(
        {
            "digest": {"me": [9.0, 99, 99]},
            "peers": [{**new.to_wire(), "peer_id": "me"}],
            "sum": b"",
        }
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
        {"news": {"x": [1.0, 1]}},
        {"events": [["x", 1.0, 1, "asleep"]]},
        {"events": [["x", float("inf"), 1, "dead"]]},
        {"events": {"x": "dead"}},
        {"sum": "abc"},
        {"sum": b"x" * 33},
        {"probe": 7},
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
    request = wire(empty.request(full=True))
    answer = full.answer(request)
    assert len(answer["peers"]) == MAX_DELTAS
    empty.take_answer(wire(answer), request)
    exchange(empty, full, full=True)
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
    m.declare_dead("a")  # a and b died: their readiness no longer counts
    m.declare_dead("b")
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


def test_an_event_far_ahead_of_the_known_heartbeat_is_ignored():
    """A forger cannot push a peer's heartbeat towards 2**63 (where its messages would stop
    validating) by suspecting it at an absurd heartbeat."""
    from shoal.peer.gossip import MAX_HEARTBEAT_STEP

    clock = Clock()
    a, b = node("a", clock), node("b", clock)
    a.membership.take([replace(b.membership.me)])
    forged = {"events": [["a", 1.0, 2**62, "suspect"], ["b", 1.0, 2**62, "dead"]], "sum": b""}
    a.answer(wire(forged))
    assert a.membership.me.heartbeat == 0 and a.membership.status("b") == "alive"
    near = {"events": [["a", 1.0, MAX_HEARTBEAT_STEP, "suspect"]], "sum": b""}
    a.answer(wire(near))
    assert a.membership.me.heartbeat == MAX_HEARTBEAT_STEP + 1  # refuted
