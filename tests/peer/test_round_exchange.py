"""The round exchange (publish / gather / agree / verify / fetch) over an in-memory network:
no sockets, the server's round endpoints played by `FakeNetwork` with the same long-poll
semantics, faults injected per (fetcher, owner)."""

import asyncio
import time

import pytest

from shoal.peer.client import PeerUnreachable
from shoal.peer.config import ProtocolConfig
from shoal.peer.errors import NotFound
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.rounds import RoundExchange
from shoal.peer.roundstore import RoundStore, check_round_request
from shoal.peer.votes import check_same_as, decide_set, hash_answer, set_answer
from shoal.peer.wire import Envelope

PROTOCOL = ProtocolConfig(agree_timeout_s=1.0, request_timeout_s=1.0, max_poll_s=0.2)


class FakeNetwork:
    """Peers by address; each has a RoundStore that the round endpoints serve."""

    def __init__(self) -> None:
        self.stores: dict[str, RoundStore] = {}
        self.dead: set[str] = set()
        # (fetcher, owner): fetching owner's contribution from owner itself always fails
        self.blocked: set[tuple[str, str]] = set()
        self.sets: dict[str, list[str]] = {}  # owner -> the set it publishes instead of its own
        self.wrong_round: set[str] = set()  # owners whose answers name another round
        # owner -> (peers, hash) it answers /round/set and /round/hash with, as round r - 1's
        self.stale: dict[str, tuple[list[str], str]] = {}
        self.delay_s: dict[str, float] = {}  # owner -> how late its answers leave
        self.answers: list[tuple[str, str, dict]] = []  # (owner, path, answer) of set/hash

    def client(self, me: str) -> "FakeClient":
        return FakeClient(self, me)


class FakeClient:
    def __init__(self, network: FakeNetwork, me: str) -> None:
        self.network, self.me = network, me

    async def call(self, address, method, path, payload=None, *, timeout_s=None, **kw) -> Envelope:
        owner = address.removeprefix("http://")
        if owner in self.network.dead:
            raise PeerUnreachable(f"{address}: connection refused")
        delay_s = self.network.delay_s.get(owner, 0.0)
        if timeout_s is not None and delay_s > timeout_s:  # the client's timeout fires first
            await asyncio.sleep(timeout_s)
            raise PeerUnreachable(f"{address}: TimeoutError")
        await asyncio.sleep(delay_s)
        store = self.network.stores[owner]
        round_id, wait_s = check_round_request(payload)
        if path == "/round/contribution":
            if (self.me, owner) in self.network.blocked and payload["peer"] == owner:
                raise PeerUnreachable(f"{address}: reset")
            held = await store.wait_for(
                lambda: store.contributions.get(round_id, {}).get(payload["peer"]), wait_s
            )
            answer = held and {"round": round_id + (owner in self.network.wrong_round), **held}
        elif owner in self.network.stale:
            peers, weights_hash = self.network.stale[owner]
            answer = {"round": round_id - 1, "peers": peers, "hash": weights_hash}
        elif path == "/round/set":
            held = await store.wait_for(lambda: store.sets.get(round_id), wait_s)
            held = self.network.sets.get(owner, held) if held is not None else None
            same_as = check_same_as(payload)
            answer = None if held is None else set_answer(round_id, held, same_as)
        else:
            held = await store.wait_for(lambda: store.hashes.get(round_id), wait_s)
            answer = held and hash_answer(round_id, held, check_same_as(payload))
        if answer is None:
            raise NotFound(f"no round-{round_id} {path} at {owner}")
        if path != "/round/contribution":
            self.network.answers.append((owner, path, answer))
        return Envelope(sender=owner, swarm_id="s", timestamp=time.time(), payload=answer)


async def decode(tensors):
    if tensors == "bad":
        raise ValueError("not a contribution")
    return tensors


def swarm(network: FakeNetwork, ids: list[str]) -> dict[str, RoundExchange]:
    exchanges = {}
    for me in ids:
        network.stores[me] = RoundStore(rounds_kept=3)
        membership = Membership(PeerInfo(me, f"http://{me}"))
        membership.merge([PeerInfo(p, f"http://{p}").to_wire() for p in ids if p != me])
        exchanges[me] = RoundExchange(
            network.client(me), membership, network.stores[me], PROTOCOL, decode
        )
    return exchanges


async def play_round(exchanges, round_id=0, contributions=None, gather_s=1.0):
    contributions = contributions or {me: [float(i)] for i, me in enumerate(exchanges)}
    for me, exchange in exchanges.items():
        answer = {"peer": me, "tensors": contributions[me]}  # what the prepared body would hold
        await exchange.publish(round_id, answer, contributions[me])
    got = await asyncio.gather(*(e.gather(round_id, gather_s) for e in exchanges.values()))
    final = await asyncio.gather(*(e.agree(round_id, gather_s + 1) for e in exchanges.values()))
    return dict(zip(exchanges, got, strict=True)), dict(zip(exchanges, final, strict=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_every_peer_gathers_agrees_and_applies_the_same_list():
    async def main():
        exchanges = swarm(FakeNetwork(), ["a", "b", "c"])
        got, final = await play_round(exchanges)
        applied = {me: e.contributions(0, final[me]) for me, e in exchanges.items()}
        return got, final, applied

    got, final, applied = run(main())
    assert all(ids == ["a", "b", "c"] for ids in got.values())
    assert all(ids == ["a", "b", "c"] for ids in final.values())
    assert all(lst == [[0.0], [1.0], [2.0]] for lst in applied.values())  # peer-id order everywhere


def test_a_contribution_one_peer_missed_is_fetched_from_a_peer_that_holds_it():
    async def main():
        network = FakeNetwork()
        network.blocked.add(("b", "c"))  # b never gets c's contribution from c
        exchanges = swarm(network, ["a", "b", "c"])
        got, final = await play_round(exchanges)
        applied = {me: e.contributions(0, final[me]) for me, e in exchanges.items()}
        return got, final, applied

    got, final, applied = run(main())
    assert got["a"] == ["a", "b", "c"] and got["b"] == ["a", "b"]
    # the majority holds c's: b fetches it from a (which serves what it gathered)
    assert all(ids == ["a", "b", "c"] for ids in final.values())
    assert all(lst == [[0.0], [1.0], [2.0]] for lst in applied.values())


def test_an_empty_set_does_not_veto_the_round():
    """Under the old rule (the intersection of the sets) c's empty set emptied the round on
    every peer; now it removes only c, which is flagged."""

    async def main():
        network = FakeNetwork()
        network.sets["c"] = []
        exchanges = swarm(network, ["a", "b", "c"])
        _, final = await play_round(exchanges)
        return final, {me: dict(e.flagged) for me, e in exchanges.items()}

    final, flagged = run(main())
    assert final["a"] == final["b"] == ["a", "b"]
    assert list(flagged["a"]) == list(flagged["b"]) == ["c"]
    assert "holds 0 of the 3" in flagged["a"]["c"]


@pytest.mark.parametrize(
    ("votes", "chosen", "flagged"),
    [
        ({"a": {"a", "b", "c"}, "b": {"a", "b", "c"}, "c": set()}, {"a", "b"}, {"c"}),
        ({"a": {"a", "b"}, "b": {"a", "b", "c"}, "c": {"a", "b", "c"}}, {"a", "b", "c"}, set()),
        ({"a": {"a", "b", "x"}, "b": {"a", "b"}, "c": {"a", "b"}}, {"a", "b"}, set()),
        # two voters agree on what both hold (an empty set empties the round there)
        ({"a": {"a", "b"}, "b": {"b"}}, {"b"}, set()),
        ({"a": {"a", "b"}, "b": set()}, set(), set()),
        # a joiner d that half of the voters know of is left out by all of them
        (
            {
                "a": {"a", "b", "c"},
                "b": {"a", "b", "c"},
                "c": {"a", "b", "c", "d"},
                "d": {"a", "b", "c", "d"},
            },
            {"a", "b", "c"},
            set(),
        ),
        ({"a": {"a", "b"}, "b": {"a", "b"}, "c": {"c"}, "d": {"c"}}, set(), set()),  # no majority
    ],
)
def test_decide_set_takes_what_more_than_half_the_voters_hold(votes, chosen, flagged):
    final, reasons = decide_set(votes)
    assert final == chosen and set(reasons) == flagged


def test_a_dead_peer_costs_at_most_the_deadline():
    async def main():
        network = FakeNetwork()
        exchanges = swarm(network, ["a", "b", "c"])
        network.dead.add("c")
        del exchanges["c"]  # c never publishes
        begin = time.monotonic()
        got, final = await play_round(exchanges, gather_s=0.8)
        return got, final, time.monotonic() - begin

    got, final, seconds = run(main())
    assert got == {"a": ["a", "b"], "b": ["a", "b"]} and final == got
    assert seconds < 0.8 + 1.0 + 1.5  # gather deadline + agree's wait + margin


def test_a_peer_declared_dead_mid_gather_stops_the_wait_before_the_deadline():
    async def main():
        network = FakeNetwork()
        exchanges = swarm(network, ["a", "b", "c"])
        del exchanges["c"]  # c is silent: its long polls answer 404, nothing says it died

        async def probe_fails():
            await asyncio.sleep(0.2)
            for exchange in exchanges.values():
                exchange.membership.declare_dead("c")

        begin = time.monotonic()
        (got, final), _ = await asyncio.gather(play_round(exchanges, gather_s=5.0), probe_fails())
        return got, final, time.monotonic() - begin

    got, final, seconds = run(main())
    assert got == {"a": ["a", "b"], "b": ["a", "b"]} and final == got
    assert seconds < 0.2 + PROTOCOL.max_poll_s + 1.0  # far inside the 5 s gather deadline


def test_a_slow_peer_is_waited_for_within_the_deadline_and_dropped_past_it():
    async def within():
        network = FakeNetwork()
        network.delay_s["c"] = 0.3
        return await play_round(swarm(network, ["a", "b", "c"]), gather_s=1.5)

    got, final = run(within())
    assert all(ids == ["a", "b", "c"] for ids in final.values())

    async def past():
        network = FakeNetwork()
        network.delay_s["c"] = 10.0  # every answer from c outlasts the request timeout
        exchanges = swarm(network, ["a", "b", "c"])
        begin = time.monotonic()
        got, final = await play_round(exchanges, gather_s=0.5)
        return got, final, time.monotonic() - begin

    got, final, seconds = run(past())
    assert got["a"] == got["b"] == ["a", "b"] and got["c"] == ["a", "b", "c"]
    assert all(ids == ["a", "b"] for ids in final.values())  # c applies the same set
    # a call in flight at the deadline may run to its own timeout: the bound of one gather;
    # then agree asks c once for its set (c's contribution missed it: not waited for)
    bound_s = 0.5 + PROTOCOL.max_poll_s + 2 * PROTOCOL.request_timeout_s
    assert seconds < bound_s + 1.0


def test_an_undecodable_contribution_is_dropped_by_everyone():
    async def main():
        return await play_round(
            swarm(FakeNetwork(), ["a", "b", "c"]),
            contributions={"a": [0.0], "b": "bad", "c": [2.0]},
        )

    got, final = run(main())
    assert got["a"] == ["a", "c"] and got["c"] == ["a", "c"]
    assert final["a"] == final["c"] == ["a", "c"]


def test_an_answer_for_the_wrong_round_is_ignored():
    async def main():
        network = FakeNetwork()
        network.wrong_round.add("c")
        return await play_round(swarm(network, ["a", "b", "c"]), gather_s=0.5)

    got, final = run(main())
    assert got["a"] == ["a", "b"] and final["a"] == ["a", "b"]


def test_set_and_hash_answers_for_another_round_are_ignored():
    """c answers round 1's questions with round 0's records: an empty set (which would
    empty the intersection) and b's hash (which would outvote a's): both are ignored."""

    async def main():
        network = FakeNetwork()
        network.stale["c"] = ([], "h2")
        exchanges = swarm(network, ["a", "b", "c"])
        _, final = await play_round(exchanges, round_id=1)
        resyncs = await asyncio.gather(
            exchanges["a"].verify(1, "h1", ["a", "b", "c"]),
            exchanges["b"].verify(1, "h2", ["a", "b", "c"]),
        )
        return final, resyncs

    final, resyncs = run(main())
    assert final["a"] == final["b"] == ["a", "b", "c"]
    # c's stale hash does not count: a and b tie, and the tie goes to the smaller hash
    assert [(sorted(p.peer_id for p in peers), h) for peers, h in resyncs] == [
        ([], "h1"),
        (["a"], "h1"),
    ]


@pytest.mark.parametrize(
    ("hashes", "resyncs"),
    [
        ({"a": "h1", "b": "h1", "c": "h2"}, {"a": [], "b": [], "c": ["a", "b"]}),
        ({"a": "h1", "b": "h2"}, {"a": [], "b": ["a"]}),  # a tie goes to the smaller hash
    ],
)
def test_verify_sends_only_a_minority_peer_to_the_majority(hashes, resyncs):
    async def main():
        exchanges = swarm(FakeNetwork(), list(hashes))
        results = await asyncio.gather(
            *(e.verify(0, hashes[me], list(hashes)) for me, e in exchanges.items())
        )
        return {
            me: sorted(p.peer_id for p in peers)
            for me, (peers, _) in zip(exchanges, results, strict=True)
        }

    assert run(main()) == resyncs


def test_fetch_gets_a_partner_or_gives_up_at_the_timeout():
    async def main():
        exchanges = swarm(FakeNetwork(), ["a", "b"])
        partner = exchanges["a"].membership.peers["b"]
        begin = time.monotonic()
        missing = await exchanges["a"].fetch(0, partner, 0.5)
        waited = time.monotonic() - begin
        await exchanges["b"].publish(0, {"peer": "b", "tensors": [1.0]}, [1.0])
        found = await exchanges["a"].fetch(0, partner, 0.5)
        return missing, waited, found

    missing, waited, found = run(main())
    assert not missing and 0.4 < waited < 2.0 and found


def test_the_store_keeps_recent_rounds_and_wakes_waiters():
    async def main():
        store = RoundStore(rounds_kept=2)
        waiter = asyncio.create_task(store.wait_for(lambda: store.sets.get(5), 5.0))
        await asyncio.sleep(0.05)
        store.put_set(5, ["a"])
        woke = await asyncio.wait_for(waiter, 1.0)
        for r in range(4):
            store.put_hash(r, f"h{r}")
        empty = await store.wait_for(lambda: store.hashes.get(9), 0.1)
        return woke, sorted(store.hashes), empty

    woke, kept, empty = run(main())
    assert woke == ["a"] and kept == [2, 3] and empty is None


def test_voters_that_agree_answer_same_and_the_decision_is_unchanged():
    """Every set answer between peers that hold the same set is a bare "same"; c's empty
    set (it publishes [] instead of what it holds) comes in full, and is still flagged."""

    async def main():
        network = FakeNetwork()
        _, final = await play_round(swarm(network, ["a", "b", "c", "d"]))
        healthy = list(network.answers)
        network.answers.clear()
        network.sets["c"] = []
        exchanges = swarm(network, ["a", "b", "c", "d"])
        _, vetoed = await play_round(exchanges)
        return final, healthy, vetoed, list(network.answers), dict(exchanges["a"].flagged)

    final, healthy, vetoed, answers, flagged = run(main())
    assert all(ids == ["a", "b", "c", "d"] for ids in final.values())
    assert len(healthy) == 4 * 3 and all(a == {"round": 0, "same": True} for _, _, a in healthy)
    assert vetoed["a"] == vetoed["b"] == vetoed["d"] == ["a", "b", "d"]
    assert [a for owner, _, a in answers if owner == "c"] == [{"round": 0, "peers": []}] * 3
    assert [a for owner, _, a in answers if owner != "c"] == [{"round": 0, "same": True}] * 9
    assert list(flagged) == ["c"]


def test_a_hash_vote_is_same_for_the_majority_and_full_for_the_minority():
    async def main():
        network = FakeNetwork()
        hashes = {"a": "h1", "b": "h1", "c": "h2"}
        exchanges = swarm(network, list(hashes))
        results = await asyncio.gather(
            *(e.verify(0, hashes[me], list(hashes)) for me, e in exchanges.items())
        )
        return network.answers, [(sorted(p.peer_id for p in ps), h) for ps, h in results]

    answers, results = run(main())
    assert results == [([], "h1"), ([], "h1"), (["a", "b"], "h1")]
    full = sorted(owner for owner, _, answer in answers if "hash" in answer)
    assert full == ["a", "b", "c", "c"]  # a and b to c, c to a and b; a and b: "same"


def test_a_peer_without_its_own_hash_gets_full_answers():
    """`majority_hash` asks about a round it may not have voted in: no digest, full votes."""

    async def main():
        network = FakeNetwork()
        exchanges = swarm(network, ["a", "b", "c"])
        for me in ("b", "c"):
            network.stores[me].put_hash(4, "h4")
        majority = await exchanges["a"].majority_hash(4, ["a", "b", "c"])
        return majority, network.answers

    majority, answers = run(main())
    assert majority == "h4"
    assert [a for _, _, a in answers] == [{"round": 4, "hash": "h4"}] * 2


def test_a_same_answer_to_a_request_without_a_digest_counts_as_none():
    from shoal.peer.votes import voted_hash, voted_set

    assert voted_set({"round": 0, "same": True}, None) is None
    assert voted_set({"round": 0, "same": True}, ["a", "b"]) == {"a", "b"}
    assert voted_set({"round": 0, "same": 1, "peers": ["a"]}, ["a", "b"]) == {"a"}
    assert voted_set({"round": 0, "peers": ["a", 3]}, ["a"]) is None
    assert voted_hash({"round": 0, "same": True}, None) is None
    assert voted_hash({"round": 0, "same": True}, "h1") == "h1"
    assert voted_hash({"round": 0, "hash": 7}, "h1") is None
