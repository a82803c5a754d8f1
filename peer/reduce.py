"""Reduce-scatter, then all-gather: a round's mean of dense pseudo-gradients for about
2·(N−1)/N of one contribution downloaded per peer, whatever the swarm's size N.

The gather (`peer.rounds`) has every peer fetch every other peer's whole contribution:
(N−1) contributions each. Here, once the round's members F are agreed (`RoundExchange.agree`
with the peers we expect), the flat pseudo-gradient (`OuterOptimizer.flat_delta`: the same
length and order on every peer) is cut into K shards of consecutive elements, K = |F| but
for small models (at least `--shard-elements` per shard, see `Layout`), each owned by one
member. `Layout.tag` names the layout in every request, so peers that agreed on different
sets never mix their shards.

1. **Reduce.** The owner of shard i fetches it from every member (`/round/shard {round, k,
   index}`: the member encodes that range of its pseudo-gradient with the run's codec, once
   per layout) and averages the shards that arrived by the deadline and decoded, in sorted
   member order (float32, elementwise: the same bits wherever it is computed). The mean is
   re-quantized with the run's codec, as INTELLECT-1 does, and served (`/round/reduced
   {round, tag, index}` → {missing, data}: the members whose shard is not in it, usually
   none, so the answer does not grow with the swarm; packed once for every asker); the owner
   uses the decoded re-quantized values too, so every peer applies the same bits.
2. **All-gather.** Every peer fetches every other owner's reduced shard and hands the K
   shards, in order, to the outer step (`apply_mean`), which takes them without
   concatenating.
3. **Fallback.** A shard whose owner is dead, misses the deadline or answers for another
   layout is reduced by the peer itself, from the members' shards, as in step 1: with the
   same contributors that gives the owner's bits; a difference (a member that reached the
   owner but not us) shows in the weights-hash vote and is resynced like any divergence.
   Members keep their pseudo-gradient until the round leaves the RoundStore.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from shoal.peer.errors import Gone, NotFound, ProtocolError
from shoal.peer.rounds import RoundExchange
from shoal.peer.roundstore import RoundStore, check_round_request

log = logging.getLogger(__name__)

PSEUDO_GRADIENT_KINDS = ("contribution", "shard", "reduced")  # their `Traffic` kinds
MAX_SHARDS = 4096  # members of one round, at most
MAX_CACHED_LAYOUTS = 2  # encoded shard sets kept per round (a member serves one layout, normally)


def shard_range(numel: int, k: int, index: int) -> tuple[int, int]:
    """Elements [start, stop) of shard `index` of `k` over a vector of `numel`."""
    return index * numel // k, (index + 1) * numel // k


def layout_tag(members: list[str], k: int = 0) -> str:
    """A short name for the layout of `k` shards over a member set (order does not matter)."""
    text = "\n".join([*sorted(members), f"k={k}"])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """Round r's shards: K = min(|F|, numel // shard_elements) (at least 1) shards of
    consecutive elements, owned by K of the members, rotated by round so that with fewer
    shards than members the work moves around. Small shards would cost more in per-message
    and per-payload overhead (an int8 payload carries a 1 KiB table) than they save."""

    members: tuple[str, ...]  # sorted
    owners: tuple[str, ...]  # owners[i] reduces shard i
    numel: int
    tag: str

    @classmethod
    def of(cls, members: list[str], numel: int, round_id: int, shard_elements: int) -> Layout:
        ordered = tuple(sorted(members))
        k = max(1, min(len(ordered), numel // max(1, shard_elements)))
        owners = tuple(ordered[(round_id + i) % len(ordered)] for i in range(k))
        return cls(ordered, owners, numel, layout_tag(list(ordered), k))

    @property
    def k(self) -> int:
        return len(self.owners)

    def range(self, index: int) -> tuple[int, int]:
        return shard_range(self.numel, self.k, index)


@dataclass
class OwnDelta:
    """Our pseudo-gradient for one round, served shard by shard (encoded on first request)."""

    flat: torch.Tensor
    encode: Callable[[torch.Tensor], bytes]
    _encoded: dict[tuple[int, int], bytes] = field(default_factory=dict)

    def shard(self, k: int, index: int) -> bytes:
        """The encoded shard (thread-safe enough: a race encodes the same bytes twice)."""
        key = (k, index)
        if key not in self._encoded:
            if len({k for k, _ in self._encoded}) >= MAX_CACHED_LAYOUTS:
                self._encoded.clear()
            start, stop = shard_range(self.flat.numel(), k, index)
            self._encoded[key] = self.encode(self.flat[start:stop])
        return self._encoded[key]


def contributors(layout: Layout, missing: list[str]) -> list[str]:
    """The members whose shard is in a reduced shard that lacks `missing`."""
    left_out = set(missing)
    return [m for m in layout.members if m not in left_out]


def _layout_request(payload: dict[str, Any]) -> tuple[int, int]:
    k, index = payload.get("k"), payload.get("index")
    if type(k) is not int or not 1 <= k <= MAX_SHARDS:
        raise ProtocolError(f"k must be an integer in 1..{MAX_SHARDS}")
    if type(index) is not int or not 0 <= index < k:
        raise ProtocolError("index must be an integer in 0..k-1")
    return k, index


async def serve_shard(store: RoundStore, me: str, payload: dict[str, Any]) -> dict[str, Any]:
    """`/round/shard`: shard `index` of `k` of our round-r pseudo-gradient, once published."""
    round_id, wait_s = check_round_request(payload)
    k, index = _layout_request(payload)
    own = await store.wait_for(lambda: store.deltas.get(round_id), wait_s)
    if own is None:
        raise NotFound(f"no round-{round_id} pseudo-gradient here yet")
    data = await asyncio.get_running_loop().run_in_executor(None, own.shard, k, index)
    return {"round": round_id, "peer": me, "k": k, "index": index, "data": data}


async def serve_reduced(store: RoundStore, payload: dict[str, Any]) -> dict[str, Any]:
    """`/round/reduced`: the mean of shard `index` we own in round r's layout `tag`."""
    round_id, wait_s = check_round_request(payload)
    tag, index = payload.get("tag"), payload.get("index")
    if not isinstance(tag, str) or len(tag) > 64:
        raise ProtocolError("tag must be a string of at most 64 characters")
    if type(index) is not int or not 0 <= index < MAX_SHARDS:
        raise ProtocolError(f"index must be an integer in 0..{MAX_SHARDS - 1}")
    other = object()

    def lookup() -> Any:
        held = store.reduced.get(round_id)
        if held is None:
            return None
        return held[1].get(index) if held[0] == tag else other

    answer = await store.wait_for(lookup, wait_s)
    if answer is other:
        raise Gone(f"our round-{round_id} set differs from layout {tag}")
    if answer is None:
        raise NotFound(f"no reduced round-{round_id} shard {index} here yet")
    return answer


class ShardedMean:
    """The client side: one round's mean by reduce-scatter + all-gather (steps 1-3)."""

    def __init__(
        self,
        exchange: RoundExchange,
        encode: Callable[[torch.Tensor], bytes],
        decode: Callable[[bytes, int], torch.Tensor],
    ) -> None:
        """`encode`/`decode`: the run's codec for a flat piece (`decode(data, count)` raises
        ValueError on an unusable payload, non-finite values included)."""
        self.exchange, self.encode, self.decode = exchange, encode, decode
        self.fallbacks = 0  # shards this peer reduced itself (tests, the round log)

    @property
    def me(self) -> str:
        return self.exchange.me

    def publish(self, round_id: int, flat: torch.Tensor) -> None:
        self.exchange.store.put_delta(round_id, OwnDelta(flat, self.encode))

    async def mean(
        self, round_id: int, members: list[str], timeout_s: float, shard_elements: int
    ) -> tuple[list[torch.Tensor] | None, list[str]]:
        """The mean over `members` (agreed) of their round-r pseudo-gradients, as its shards
        in order (`OuterOptimizer.apply_mean` takes them without a model-sized concatenation),
        and the members whose pseudo-gradient is in every shard of it (a member whose shard did
        not reach an owner is left out of that shard only); None if there are no members."""
        if not members:  # every set refused, ours included: nothing to average
            return None, []
        store, loop = self.exchange.store, asyncio.get_running_loop()
        numel = store.deltas[round_id].flat.numel()
        layout = Layout.of(members, numel, round_id, shard_elements)
        deadline = loop.time() + timeout_s
        store.put_layout(round_id, layout.tag)
        shards = await asyncio.gather(
            *(self._shard(round_id, layout, i, deadline) for i in range(layout.k))
        )
        applied = set(members).intersection(*(contributors for _, contributors in shards))
        return [values for values, _ in shards], sorted(applied)

    async def _shard(
        self, round_id: int, layout: Layout, index: int, deadline: float
    ) -> tuple[torch.Tensor, list[str]]:
        owner = layout.owners[index]
        if owner == self.me:
            answer, values = await self._reduce(round_id, layout, index, deadline)
            # packed, compressed and hashed once for the K − 1 peers that fetch it
            wire = self.exchange.client.wire
            prepared = await asyncio.get_running_loop().run_in_executor(None, wire.prepare, answer)
            self.exchange.store.put_reduced(round_id, layout.tag, index, prepared)
            return values, contributors(layout, answer["missing"])
        got = await self._fetch_reduced(round_id, layout, index, deadline)
        if got is not None:
            return got
        self.fallbacks += 1
        log.info(
            "[%s] round %d: shard %d of %d not delivered by %s; reducing it here",
            self.me,
            round_id,
            index,
            layout.k,
            owner,
        )
        loop = asyncio.get_running_loop()
        late = max(deadline, loop.time() + self.exchange.protocol.agree_timeout_s)
        answer, values = await self._reduce(round_id, layout, index, late)
        return values, contributors(layout, answer["missing"])

    async def _fetch_reduced(
        self, round_id: int, layout: Layout, index: int, deadline: float
    ) -> tuple[torch.Tensor, list[str]] | None:
        """The owner's reduced shard, or None (no answer by the deadline, or unusable)."""
        owner = self.exchange.membership.peers.get(layout.owners[index])
        if owner is None:
            return None
        request = {"round": round_id, "tag": layout.tag, "index": index}
        late = deadline + self.exchange.protocol.agree_timeout_s  # the owner's own deadline
        answer = await self.exchange.poll(owner, "/round/reduced", request, late, wait=True)
        if answer is None:
            return None
        missing, data = answer.get("missing"), answer.get("data")
        start, stop = layout.range(index)
        problem = None
        if answer.get("tag") != layout.tag or answer.get("index") != index:
            problem = "names another shard"
        elif not (
            isinstance(missing, list)
            and all(isinstance(m, str) for m in missing)
            and set(missing) <= set(layout.members)
        ):
            problem = "its missing contributors are not members of the round"
        elif len(set(missing)) == len(layout.members) or not isinstance(data, bytes):
            problem = "holds no data"
        else:
            try:
                values = await self._decode(data, stop - start)
                return values, contributors(layout, missing)
            except ValueError as exc:
                problem = str(exc)
        log.warning(
            "[%s] round %d: %s's reduced shard %d refused: %s",
            self.me,
            round_id,
            owner.peer_id,
            index,
            problem,
        )
        return None

    async def _reduce(
        self, round_id: int, layout: Layout, index: int, deadline: float
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Step 1 for shard `index`: the members' shards averaged, re-quantized; returns the
        `/round/reduced` answer and its decoded values."""
        start, stop = layout.range(index)
        pieces = await asyncio.gather(
            *(
                self._member_shard(round_id, m, layout.k, index, stop - start, deadline)
                for m in layout.members
            )
        )
        held = [(m, p) for m, p in zip(layout.members, pieces, strict=True) if p is not None]
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(
            None, self._requantized_mean, [p for _, p in held], stop - start
        )
        values = await self._decode(data, stop - start)
        answer = {
            "round": round_id,
            "tag": layout.tag,
            "index": index,
            "missing": sorted(set(layout.members) - {m for m, _ in held}),
            "data": data,
        }
        return answer, values

    def _requantized_mean(self, pieces: list[torch.Tensor], count: int) -> bytes:
        if not pieces:  # nobody's shard arrived (a fallback whose members all died)
            return self.encode(torch.zeros(count))
        mean = pieces[0].clone()
        for other in pieces[1:]:  # fixed order, elementwise: identical on every peer
            mean.add_(other)
        return self.encode(mean.mul_(1.0 / len(pieces)))

    async def _member_shard(
        self, round_id: int, member: str, k: int, index: int, count: int, deadline: float
    ) -> torch.Tensor | None:
        store = self.exchange.store
        if member == self.me:
            own = store.deltas[round_id]
            data = await asyncio.get_running_loop().run_in_executor(None, own.shard, k, index)
        else:
            peer = self.exchange.membership.peers.get(member)
            if peer is None:
                return None
            request = {"round": round_id, "k": k, "index": index}
            answer = await self.exchange.poll(peer, "/round/shard", request, deadline, wait=True)
            if answer is None:
                return None
            if (answer.get("peer"), answer.get("k"), answer.get("index")) != (member, k, index):
                log.warning("[%s] %s answered for another shard", self.me, member)
                return None
            data = answer.get("data")
        try:
            if not isinstance(data, bytes):
                raise ValueError("data must be bytes")
            return await self._decode(data, count)
        except ValueError as exc:
            log.warning(
                "[%s] dropped %s's round-%d shard %d: %s", self.me, member, round_id, index, exc
            )
            return None

    async def _decode(self, data: bytes, count: int) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(None, self.decode, data, count)
