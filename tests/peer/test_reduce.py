"""Reduce-scatter's pieces: shard layout, the served shards and means, the owner's mean."""

import asyncio
from types import SimpleNamespace

import pytest
import torch

from shoal.compression import get_codec
from shoal.peer.errors import Gone, NotFound, ProtocolError
from shoal.peer.reduce import (
    MAX_CACHED_LAYOUTS,
    Layout,
    OwnDelta,
    ShardedMean,
    layout_tag,
    serve_reduced,
    serve_shard,
    shard_range,
)
from shoal.peer.roundstore import RoundStore

CODEC = get_codec("int8")


def encode(piece):
    return CODEC.encode(piece)


def decode(data, count):
    return CODEC.decode(data, (count,))


@pytest.mark.parametrize("numel", [0, 1, 5, 64, 34_976])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_shards_tile_the_vector(numel, k):
    ranges = [shard_range(numel, k, i) for i in range(k)]
    assert ranges[0][0] == 0 and ranges[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_layout_tag_names_the_set_not_its_order():
    assert layout_tag(["b", "a", "c"]) == layout_tag(["a", "b", "c"])
    assert layout_tag(["a", "b"]) != layout_tag(["a", "b", "c"])


@pytest.mark.parametrize(
    ("members", "numel", "shard_elements", "k"),
    [
        (4, 40, 10, 4),
        (4, 40, 20, 2),
        (4, 40, 1000, 1),
        (32, 34_976, 65_536, 1),
        (8, 10**7, 65_536, 8),
    ],
)
def test_layout_has_no_shard_smaller_than_asked_but_one(members, numel, shard_elements, k):
    ids = [f"p{i:02d}" for i in range(members)]
    layouts = [Layout.of(ids, numel, r, shard_elements) for r in range(members)]
    assert all(layout.k == k for layout in layouts)
    assert len({layout.tag for layout in layouts}) == 1  # the same set: the same layout name
    # owners rotate by round: over `members` rounds every member owns shard 0 once
    assert sorted(layout.owners[0] for layout in layouts) == ids
    assert Layout.of(ids[::-1], numel, 0, shard_elements) == layouts[0]
    assert Layout.of(ids[:-1], numel, 0, shard_elements).tag != layouts[0].tag


def test_own_delta_encodes_each_shard_once_and_bounds_its_cache():
    calls = []
    flat = torch.randn(1000)
    own = OwnDelta(flat, lambda piece: calls.append(piece.numel()) or encode(piece))
    data = own.shard(3, 1)
    assert own.shard(3, 1) is data and calls == [333]
    start, stop = shard_range(1000, 3, 1)
    assert torch.allclose(decode(data, stop - start), flat[start:stop], atol=0.05)
    for k in range(4, 4 + MAX_CACHED_LAYOUTS + 1):
        own.shard(k, 0)
    assert len({k for k, _ in own._encoded}) <= MAX_CACHED_LAYOUTS


def test_serve_shard_checks_the_request_and_waits_for_the_delta():
    async def scenario():
        store = RoundStore()
        for bad in ({"k": 0, "index": 0}, {"k": 2, "index": 2}, {"k": True, "index": 0}):
            with pytest.raises(ProtocolError):
                await serve_shard(store, "me", {"round": 1, "wait_s": 0, **bad})
        with pytest.raises(NotFound):
            await serve_shard(store, "me", {"round": 1, "k": 2, "index": 0, "wait_s": 0})
        flat = torch.arange(10, dtype=torch.float32)
        waiting = asyncio.create_task(
            serve_shard(store, "me", {"round": 1, "k": 2, "index": 1, "wait_s": 5})
        )
        await asyncio.sleep(0.05)
        store.put_delta(1, OwnDelta(flat, encode))
        answer = await asyncio.wait_for(waiting, 5)
        assert (answer["round"], answer["peer"], answer["k"], answer["index"]) == (1, "me", 2, 1)
        assert torch.allclose(decode(answer["data"], 5), flat[5:], atol=0.05)

    asyncio.run(scenario())


def test_serve_reduced_refuses_another_layout_at_once():
    async def scenario():
        store = RoundStore()
        request = {"round": 2, "tag": "t1", "index": 0, "wait_s": 0}
        with pytest.raises(NotFound):
            await serve_reduced(store, request)
        store.put_layout(2, "t2")
        with pytest.raises(Gone):
            await serve_reduced(store, {**request, "wait_s": 30})  # no waiting out the poll
        store.put_layout(2, "t1")
        store.put_reduced(2, "t1", 0, {"round": 2, "index": 0})
        assert (await serve_reduced(store, request))["index"] == 0
        store.put_reduced(2, "t-other", 1, {"round": 2})  # another layout: not kept
        assert 1 not in store.reduced[2][1]
        with pytest.raises(ProtocolError):
            await serve_reduced(store, {**request, "tag": 7})

    asyncio.run(scenario())


class FakeExchange:
    """What ShardedMean uses of a RoundExchange, with scripted answers per member."""

    def __init__(self, me, answers):
        self.me, self.answers, self.store = me, answers, RoundStore()
        self.membership = SimpleNamespace(peers={m: SimpleNamespace(peer_id=m) for m in answers})
        self.protocol = SimpleNamespace(agree_timeout_s=0.1)

    async def poll(self, peer, path, request, deadline, wait):
        answer = self.answers[peer.peer_id](request)  # as RoundExchange.poll: of this round
        return answer if answer and answer.get("round") == request["round"] else None


def test_owner_mean_drops_unusable_shards_and_is_the_same_bits_anywhere():
    members = ["a", "b", "c", "d"]
    flats = {
        m: torch.randn(40, generator=torch.Generator().manual_seed(i))
        for i, m in enumerate(members)
    }

    def serving(member, corrupt=None):
        def answer(request):
            data = OwnDelta(flats[member], encode).shard(request["k"], request["index"])
            if corrupt == "count":
                data = encode(torch.zeros(3))
            elif corrupt == "nan":
                return {**request, "peer": member, "data": b"\0" * len(data)}
            return {**request, "peer": member, "data": data}

        return answer

    async def owner_mean(me, answers):
        exchange = FakeExchange(me, answers)
        sharded = ShardedMean(exchange, encode, decode)
        sharded.publish(0, flats[me])
        layout = Layout.of(members, 40, 0, shard_elements=10)
        return await sharded._reduce(0, layout, 1, asyncio.get_running_loop().time() + 1)

    async def scenario():
        honest = {m: serving(m) for m in members}
        answer, values = await owner_mean("b", honest)
        assert answer["missing"] == []
        start, stop = shard_range(40, 4, 1)
        exact = torch.stack([flats[m][start:stop] for m in members]).mean(0)
        assert torch.allclose(values, exact, atol=0.05)
        # another peer reducing the same shard (a fallback) computes the same bits
        again, values_elsewhere = await owner_mean("d", honest)
        assert again["data"] == answer["data"] and torch.equal(values, values_elsewhere)
        # a wrong-sized shard and a corrupt one are dropped, the rest averaged
        bad = {**honest, "a": serving("a", "count"), "c": serving("c", "nan")}
        answer, _ = await owner_mean("b", bad)
        assert answer["missing"] == ["a", "c"]

    asyncio.run(scenario())


def test_a_reduced_shard_names_only_its_missing_members_and_is_checked():
    """`/round/reduced` lists the members whose shard is not in the mean (none, normally:
    the answer does not grow with the swarm); a list naming strangers, or every member, is
    refused and the shard is reduced elsewhere."""
    members = ["a", "b", "c", "d"]
    layout = Layout.of(members, 40, 0, shard_elements=10)
    start, stop = layout.range(2)
    data = encode(torch.arange(stop - start, dtype=torch.float32))

    def fetch(missing):
        def answer(request):
            return {**request, "missing": missing, "data": data}

        async def scenario():
            sharded = ShardedMean(FakeExchange("a", {layout.owners[2]: answer}), encode, decode)
            deadline = asyncio.get_running_loop().time() + 1
            return await sharded._fetch_reduced(0, layout, 2, deadline)

        return asyncio.run(scenario())

    values, contributors = fetch([])
    assert contributors == members and torch.equal(values, decode(data, stop - start))
    assert fetch(["c"])[1] == ["a", "b", "d"]
    assert fetch(["c", "x"]) is None  # a stranger
    assert fetch(members) is None  # nobody's shard: no data
    assert fetch("c") is None  # not a list
    assert fetch([["c"]]) is None  # not ids (unhashable: refused, not a crash)


def test_the_store_keeps_two_rounds_of_pseudo_gradients():
    async def scenario():
        store = RoundStore(rounds_kept=3)
        for round_id in range(4):
            store.put_delta(round_id, OwnDelta(torch.zeros(4), encode))
        return sorted(store.deltas)

    assert asyncio.run(scenario()) == [2, 3]


def test_no_members_no_mean_and_no_step():
    from shoal.optim.outer import OuterConfig
    from shoal.optim.registry import build_outer

    async def scenario():
        sharded = ShardedMean(FakeExchange("a", {}), encode, decode)
        return await sharded.mean(0, [], 1.0, shard_elements=10)

    assert asyncio.run(scenario()) == (None, [])
    outer = build_outer({"w": torch.ones(3)}, OuterConfig(codec="int8"))
    before = {n: t.clone() for n, t in outer.state_tensors().items()}
    outer.apply_mean(None)
    assert all(torch.equal(before[n], t) for n, t in outer.state_tensors().items())
