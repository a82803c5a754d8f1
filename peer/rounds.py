"""Outer rounds without a coordinator: publish, gather, agree, verify.

Round r is named by its number; every message below carries it, and an answer naming
another round than the one asked for counts as missing (a signed answer binds its request's
nonce, but a peer could still answer a round-r question with round r-1's set).

1. **Publish.** After its inner steps a peer stores its encoded contribution for round r
   in its RoundStore, as the prepared answer body (packed and hashed once, off the event
   loop, whoever fetches it), where others fetch it (`POST /round/contribution {round, peer,
   wait_s}`: a long poll that answers as soon as the contribution is held, or 404 after
   `wait_s`).
2. **Gather.** It fetches round r from every live peer whose `first_round <= r`, retrying
   until all arrived, the peer is declared dead, or the gather deadline (derived from the
   measured inner-phase time) passes. Each contribution is decoded and validated as it arrives; an
   invalid one is dropped (every honest peer drops the same bytes).
3. **Agree.** It publishes the set of peer ids it holds (`/round/set`) and fetches the
   sets of those peers. The round's set is the intersection of the sets it obtained: a
   contribution that any participant missed is left out by everyone who sees that
   participant's set, so peers that saw the same sets aggregate exactly the same
   contributions (a late joiner that reached only some peers is left out by all).
4. **Verify.** After the outer step it publishes its weights hash for round r
   (`/round/hash`) and compares with the participants'. A peer in a strict minority
   resyncs its outer state from a peer of the majority (see `peer.statesync`).

Timeouts end every wait; a dead or silent peer costs at most the deadline, never the run.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.peer.client import PeerClient, PeerUnreachable
from shoal.peer.config import ProtocolConfig
from shoal.peer.envelope import show
from shoal.peer.errors import NotFound, ProtocolError, ShoalError
from shoal.peer.membership import Membership, PeerInfo

log = logging.getLogger(__name__)

Decoder = Callable[[Any], Awaitable[Any]]  # raises ValueError on an unusable contribution


class RoundStore:
    """What this peer holds for recent rounds and serves to others (event-loop only)."""

    def __init__(self, rounds_kept: int = 3) -> None:
        self.rounds_kept = rounds_kept
        self.contributions: dict[int, dict[str, Any]] = {}
        self.sets: dict[int, list[str]] = {}
        self.hashes: dict[int, str] = {}
        self._changed = asyncio.Event()

    def _bump(self, round_id: int) -> None:
        for table in (self.contributions, self.sets, self.hashes):
            for old in [r for r in table if r <= round_id - self.rounds_kept]:
                del table[old]
        self._changed.set()
        self._changed = asyncio.Event()

    def put_contribution(self, round_id: int, peer_id: str, answer: Any) -> None:
        """`answer`: what `/round/contribution` returns for it (a prepared body)."""
        self.contributions.setdefault(round_id, {})[peer_id] = answer
        self._bump(round_id)

    def put_set(self, round_id: int, peer_ids: list[str]) -> None:
        self.sets[round_id] = peer_ids
        self._bump(round_id)

    def put_hash(self, round_id: int, weights_hash: str) -> None:
        self.hashes[round_id] = weights_hash
        self._bump(round_id)

    async def wait_for(self, lookup: Callable[[], Any], wait_s: float) -> Any:
        """Return `lookup()` once it is not None, or None after `wait_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait_s)
        while (value := lookup()) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return None
        return value


class RoundExchange:
    """The client side of steps 2-4 for one peer."""

    def __init__(
        self,
        client: PeerClient,
        membership: Membership,
        store: RoundStore,
        protocol: ProtocolConfig,
        decode: Decoder,
    ) -> None:
        self.client = client
        self.membership = membership
        self.store = store
        self.protocol = protocol
        self.decode = decode
        self.decoded: dict[int, dict[str, Any]] = {}

    @property
    def me(self) -> str:
        return self.membership.me.peer_id

    async def publish(self, round_id: int, answer: Any, decoded: Any) -> None:
        """Step 1: serve `answer` (the prepared `/round/contribution` body of our
        contribution) and hold our own `decoded` contribution for the aggregate."""
        self.decoded = {round_id: {self.me: decoded}}
        self.store.put_contribution(round_id, self.me, answer)

    async def _poll(
        self, peer: PeerInfo, path: str, request: dict[str, Any], deadline: float, wait: bool
    ) -> dict[str, Any] | None:
        """Long-poll `path` at `peer` until it answers, the deadline passes or the peer dies."""
        loop = asyncio.get_running_loop()
        while (remaining := deadline - loop.time()) > 0 and self.membership.is_alive(peer.peer_id):
            wait_s = min(remaining, self.protocol.max_poll_s) if wait else 0.0
            try:
                envelope = await self.client.call(
                    peer.address,
                    "POST",
                    path,
                    {**request, "wait_s": wait_s},
                    timeout_s=wait_s + self.protocol.request_timeout_s,
                )
                return envelope.payload
            except NotFound:
                if not wait:
                    return None
            except PeerUnreachable:
                if not wait:
                    return None
                await asyncio.sleep(min(0.5, max(0.0, remaining)))
            except ShoalError as exc:
                log.warning("[%s] %s from %s failed: %s", self.me, path, peer.peer_id, exc)
                return None
        return None

    def _for_round(
        self, answer: dict[str, Any] | None, round_id: int, peer: PeerInfo, what: str
    ) -> dict[str, Any] | None:
        """`answer` if it names `round_id` (an int, not a bool), else None, logged: an answer
        for another round, even a correctly signed one, counts as a missing answer."""
        if answer is None:
            return None
        named = answer.get("round")
        if type(named) is int and named == round_id:
            return answer
        log.warning(
            "[%s] %s's %s answer names round %s, not %d: ignored",
            self.me,
            peer.peer_id,
            what,
            show(named),
            round_id,
        )
        return None

    async def _fetch_contribution(
        self, round_id: int, owner: str, source: PeerInfo, deadline: float, wait: bool
    ) -> bool:
        payload = await self._poll(
            source, "/round/contribution", {"round": round_id, "peer": owner}, deadline, wait
        )
        if payload is None:
            return False
        if not self._for_round(payload, round_id, source, "contribution"):
            return False
        if payload.get("peer") != owner:
            log.warning("[%s] %s answered for the wrong peer", self.me, source.peer_id)
            return False
        if owner in self.decoded.get(round_id, {}):
            return True
        tensors = payload.get("tensors")
        try:
            decoded = await self.decode(tensors)
        except ValueError as exc:
            log.warning(
                "[%s] dropped %s's round-%d contribution: %s", self.me, owner, round_id, exc
            )
            return False
        self.decoded.setdefault(round_id, {})[owner] = decoded
        return True

    async def gather(self, round_id: int, timeout_s: float) -> list[str]:
        """Step 2: fetch round r from every live peer; returns the ids held."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        fetches = [
            self._fetch_contribution(
                round_id, p.peer_id, p, deadline, wait=p.first_round <= round_id
            )
            for p in self.membership.live_others()
        ]
        await asyncio.gather(*fetches)
        return sorted(self.decoded.get(round_id, {}))

    async def fetch(self, round_id: int, peer: PeerInfo, timeout_s: float) -> bool:
        """Fetch one peer's round-r contribution, waiting for it at most `timeout_s` (NoLoCo's
        partner exchange). True if it arrived and decoded."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        return await self._fetch_contribution(round_id, peer.peer_id, peer, deadline, wait=True)

    async def agree(self, round_id: int, timeout_s: float) -> list[str]:
        """Step 3: the intersection of the participants' sets. Returns the final set.

        `timeout_s` should cover the others' gather deadline: a slower peer publishes its
        set only when its own gather ends."""
        held = sorted(self.decoded.get(round_id, {}))
        self.store.put_set(round_id, held)
        deadline = asyncio.get_running_loop().time() + timeout_s
        others = [
            self.membership.peers[p] for p in held if p != self.me and p in self.membership.peers
        ]
        answers = await asyncio.gather(
            *(self._poll(p, "/round/set", {"round": round_id}, deadline, wait=True) for p in others)
        )
        final = set(held)
        for peer, answer in zip(others, answers, strict=True):
            answer = self._for_round(answer, round_id, peer, "set")
            ids = answer.get("peers") if answer else None
            if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
                final &= set(ids)
        if self.me not in final:
            log.info(
                "[%s] round %d: our contribution missed by some peer; applying without it",
                self.me,
                round_id,
            )
        return sorted(final)

    def contributions(self, round_id: int, peer_ids: list[str]) -> list[Any]:
        """Decoded contributions of the final set, in peer-id order (the same on every peer)."""
        held = self.decoded.get(round_id, {})
        return [held[p] for p in sorted(peer_ids)]

    async def verify(self, round_id: int, my_hash: str, participants: list[str]) -> list[PeerInfo]:
        """Step 4: compare weight hashes; returns majority peers to resync from if we drifted."""
        self.store.put_hash(round_id, my_hash)
        deadline = asyncio.get_running_loop().time() + self.protocol.agree_timeout_s
        others = [
            self.membership.peers[p]
            for p in participants
            if p != self.me and p in self.membership.peers
        ]
        answers = await asyncio.gather(
            *(
                self._poll(p, "/round/hash", {"round": round_id}, deadline, wait=True)
                for p in others
            )
        )
        checked = [
            self._for_round(a, round_id, p, "hash") for p, a in zip(others, answers, strict=True)
        ]
        hashes = {
            p.peer_id: a.get("hash")
            for p, a in zip(others, checked, strict=True)
            if a and isinstance(a.get("hash"), str)
        }
        counts = Counter([my_hash, *hashes.values()])
        top_hash, top_count = counts.most_common(1)[0]
        if top_hash == my_hash or top_count <= counts[my_hash]:
            return []
        log.warning(
            "[%s] round %d: weights hash %s is in the minority (%d vs %d); resyncing",
            self.me,
            round_id,
            my_hash[:8],
            counts[my_hash],
            top_count,
        )
        return [p for p in others if hashes.get(p.peer_id) == top_hash]


def check_round_request(payload: dict[str, Any]) -> tuple[int, float]:
    """Validate the round and wait of a round request (server side)."""
    round_id, wait_s = payload.get("round"), payload.get("wait_s", 0.0)
    if not isinstance(round_id, int) or isinstance(round_id, bool) or round_id < 0:
        raise ProtocolError("round must be a non-negative integer")
    if not isinstance(wait_s, (int, float)) or isinstance(wait_s, bool) or not 0 <= wait_s <= 60:
        raise ProtocolError("wait_s must be a number in [0, 60]")
    return round_id, float(wait_s)
