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
   sets of those peers (a peer whose set is the same answers just that: `peer.votes`).
   The round's set is decided by majority (`peer.votes.decide_set`): every id
   held by more than half of the peers whose sets it obtained (itself included), less any
   peer whose own set holds fewer than half of those (flagged: one peer publishing an
   empty set no longer empties the round, as the intersection of the sets once did). A
   contribution in the set that it missed is fetched from its owner, else from a peer
   that holds it (peers serve what they gathered); peers that saw the same sets apply the
   same contributions, and one that could not fetch one shows up in step 4.
4. **Verify.** After the outer step it publishes its weights hash for round r
   (`/round/hash`) and compares with the participants' (one vote per peer id; "same" as
   ours, or theirs in full: `peer.votes`). A peer
   without the most published hash (a tie goes to the smallest) resyncs its outer state
   from the peers that have it (`peer.statesync`)
   and refuses a downloaded state whose weights do not hash to the majority's hash
   (`state_check`), whatever its server claims.

With reduce-scatter (`peer.reduce`, dense codecs) step 2 is skipped: the set a peer
publishes is the peers it expects, and the agreed set is averaged shard by shard.

Timeouts end every wait; a dead or silent peer costs at most the deadline, never the run.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import torch

from shoal.optim.outer import weights_hash
from shoal.peer.client import PeerClient, PeerUnreachable
from shoal.peer.config import ProtocolConfig
from shoal.peer.envelope import show
from shoal.peer.errors import NotFound, ShoalError
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.roundstore import RoundStore
from shoal.peer.statesync import StateCheck
from shoal.peer.votes import decide_set, hash_request, set_request, voted_hash, voted_set

log = logging.getLogger(__name__)

Decoder = Callable[[Any], Awaitable[Any]]  # raises ValueError on an unusable contribution


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
        self.flagged: dict[str, str] = {}  # peer id -> why its set was left out (dashboard)

    @property
    def me(self) -> str:
        return self.membership.me.peer_id

    async def publish(self, round_id: int, answer: Any, decoded: Any) -> None:
        """Step 1: serve `answer` (the prepared `/round/contribution` body of our
        contribution) and hold our own `decoded` contribution for the aggregate."""
        self.decoded = {round_id: {self.me: decoded}}
        self.store.put_contribution(round_id, self.me, answer)

    async def poll(
        self, peer: PeerInfo, path: str, request: dict[str, Any], deadline: float, wait: bool
    ) -> dict[str, Any] | None:
        """Long-poll `path` at `peer` for `request`'s round until it answers, the deadline
        passes or the peer dies. An answer naming another round is logged and counts as none."""
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
                return self._for_round(envelope.payload, request["round"], peer, path)
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
        self, answer: dict[str, Any], round_id: int, peer: PeerInfo, path: str
    ) -> dict[str, Any] | None:
        """`answer` if it names `round_id` (an int, not a bool), else None, logged: an answer
        for another round, even a correctly signed one, counts as a missing answer."""
        named = answer.get("round")
        if type(named) is int and named == round_id:
            return answer
        log.warning(
            "[%s] %s's %s answer names round %s, not %d: ignored",
            self.me,
            peer.peer_id,
            path,
            show(named),
            round_id,
        )
        return None

    async def _fetch_contribution(
        self, round_id: int, owner: str, source: PeerInfo, deadline: float, wait: bool
    ) -> bool:
        payload = await self.poll(
            source, "/round/contribution", {"round": round_id, "peer": owner}, deadline, wait
        )
        if payload is None:
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
        if owner != self.me:  # serve it on to a peer that missed it (`agree`)
            self.store.put_contribution(round_id, owner, payload)
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

    async def agree(
        self, round_id: int, timeout_s: float, view: list[str] | None = None
    ) -> list[str]:
        """Step 3: publish the set we hold, fetch the participants' sets and decide the
        round's set by majority (`decide_set`): neither one peer nor a minority can shrink
        it, and a peer whose set is implausibly small is flagged and left out. A contribution
        the majority holds and we missed is fetched from its owner, else from a peer that
        holds it; if none delivers, we apply without it, and the weights-hash vote resyncs us.

        `timeout_s` should cover the others' gather deadline: a slower peer publishes its
        set only when its own gather ends. With reduce-scatter (`peer.reduce`) nothing was
        gathered: the set we publish is `view`, the peers we expect in the round (a peer
        publishes its set once its pseudo-gradient is ready), and a member that never
        delivers is left out of the shards by their owners at the deadline. Not requiring
        each member's own set to reach us keeps the decision the same on peers that got
        slightly different sets (a load spike that delays one answer)."""
        if view is None:
            held = sorted(self.decoded.get(round_id, {}))
        else:
            held = sorted({*view, self.me})
        self.store.put_set(round_id, held)
        deadline = asyncio.get_running_loop().time() + timeout_s
        # every peer we expected votes, also one whose contribution we missed (so that the
        # others' majority can outweigh our miss), but that one is asked once, not waited
        # for: a peer that missed our gather deadline is slow or gone
        expected = {p.peer_id for p in self.membership.live_others() if p.first_round <= round_id}
        voters = sorted((set(held) | expected) - {self.me})
        others = [self.membership.peers[p] for p in voters if p in self.membership.peers]
        request = set_request(round_id, held)  # a voter holding the same answers "same"
        answers = await asyncio.gather(
            *(self.poll(p, "/round/set", request, deadline, p.peer_id in held) for p in others)
        )
        votes = {self.me: set(held)}
        for peer, answer in zip(others, answers, strict=True):
            if (ids := voted_set(answer, held)) is not None:
                votes[peer.peer_id] = ids
        final, flagged = decide_set(votes)
        for peer_id, why in flagged.items():
            log.warning("[%s] round %d: %s left out: %s", self.me, round_id, peer_id, why)
            self.flagged[peer_id] = f"round {round_id}: {why}"
        if view is not None:  # owners fetch each member's shard: it must be one we can reach
            final = {p for p in final if p == self.me or p in self.membership.peers}
        else:
            missing = sorted(final - set(held))
            fetched = await asyncio.gather(
                *(self._fetch_missed(round_id, p, votes, deadline) for p in missing)
            )
            final -= {p for p, ok in zip(missing, fetched, strict=True) if not ok}
        if self.me not in final:
            log.info(
                "[%s] round %d: our contribution missed by the majority; applying without it",
                self.me,
                round_id,
            )
        return sorted(final)

    async def _fetch_missed(
        self, round_id: int, owner: str, votes: dict[str, set[str]], deadline: float
    ) -> bool:
        """A contribution we missed: from its owner, else from a peer whose set holds it."""
        holders = [owner, *sorted(v for v, ids in votes.items() if owner in ids and v != owner)]
        for source in (self.membership.peers.get(h) for h in holders if h != self.me):
            if source is not None and await self._fetch_contribution(
                round_id, owner, source, deadline, wait=False
            ):
                return True
        log.warning(
            "[%s] round %d: %s's contribution, held by the majority, reached us from nobody",
            self.me,
            round_id,
            owner,
        )
        return False

    async def partner(
        self, round_id: int, rng: random.Random, timeout_s: float
    ) -> tuple[list[str], str | None]:
        """NoLoCo: fetch one random live replica's contribution for this step, waiting at most
        `timeout_s`; returns the group (us, plus the partner if it answered) and the partner.
        A failed partner costs this step its averaging, never more than the timeout."""
        candidates = [
            p
            for p in self.membership.live_others()
            if p.role == "replica" and p.first_round <= round_id
        ]
        if not candidates:
            return [self.me], None
        partner = rng.choice(candidates)
        if not await self.fetch(round_id, partner, timeout_s):
            log.info(
                "[%s] step %d: partner %s did not answer; stepping alone",
                self.me,
                round_id,
                partner.peer_id,
            )
            return [self.me], None
        return sorted([self.me, partner.peer_id]), partner.peer_id

    def contributions(self, round_id: int, peer_ids: list[str]) -> list[Any]:
        """Decoded contributions of the final set, in peer-id order (the same on every peer)."""
        held = self.decoded.get(round_id, {})
        return [held[p] for p in sorted(peer_ids)]

    async def hashes(self, round_id: int, participants: list[str]) -> dict[str, str]:
        """The round-r weights hashes `participants` published (one per peer id), waiting at
        most `agree_timeout_s` for them. Those equal to the one we published for round r (if
        any) come back as a bare "same" (`peer.votes`)."""
        deadline = asyncio.get_running_loop().time() + self.protocol.agree_timeout_s
        others = [
            self.membership.peers[p]
            for p in participants
            if p != self.me and p in self.membership.peers
        ]
        mine = self.store.hashes.get(round_id)
        request = hash_request(round_id, mine)
        answers = await asyncio.gather(
            *(self.poll(p, "/round/hash", request, deadline, wait=True) for p in others)
        )
        votes = {p.peer_id: voted_hash(a, mine) for p, a in zip(others, answers, strict=True)}
        return {peer_id: h for peer_id, h in votes.items() if h is not None}

    async def verify(
        self, round_id: int, my_hash: str, participants: list[str]
    ) -> tuple[list[PeerInfo], str]:
        """Step 4: compare weight hashes, one vote per participant. Returns the majority's
        peers to resync from (none if ours is the most published hash, ties going to the
        smallest) and its hash, which the state we download from them must have."""
        self.store.put_hash(round_id, my_hash)
        hashes = await self.hashes(round_id, participants)
        counts = Counter([my_hash, *hashes.values()])
        top_count = max(counts.values())
        # the most published hash; a tie goes to the smallest, so that a swarm split in equal
        # halves still converges (before, neither half resynced and they trained apart)
        top_hash = min(h for h, n in counts.items() if n == top_count)
        if top_hash == my_hash:
            return [], my_hash
        log.warning(
            "[%s] round %d: weights hash %s is in the minority (%d vs %d); resyncing",
            self.me,
            round_id,
            my_hash[:8],
            counts[my_hash],
            top_count,
        )
        peers = [self.membership.peers[p] for p, h in sorted(hashes.items()) if h == top_hash]
        return peers, top_hash

    async def majority_hash(self, round_id: int, participants: list[str]) -> str | None:
        """The hash more than half of `participants` (not us) published for round r."""
        hashes = await self.hashes(round_id, [p for p in participants if p != self.me])
        top = Counter(hashes.values()).most_common(1)
        voters = len([p for p in participants if p != self.me])
        return top[0][0] if top and 2 * top[0][1] > voters else None


def resync_terms(
    exchange: RoundExchange, round_id: int, top_hash: str, participants: list[str]
) -> dict[str, Any]:
    """What a resync after round r's vote asks of `download_state`: round r + 1's state
    (the majority publishes it once its own vote ends: wait for it) that passes
    `state_check`."""
    protocol = exchange.protocol
    return {
        "check": state_check(exchange, round_id, top_hash, participants),
        "min_round": round_id + 1,
        "min_round_wait_s": protocol.min_gather_timeout_s + protocol.agree_timeout_s,
    }


def state_check(
    exchange: RoundExchange, round_id: int, top_hash: str, participants: list[str]
) -> StateCheck:
    """For a resync after round r's vote: a downloaded state must carry the weights whose hash
    the majority of the participants published for its round (round r + 1's: `top_hash`;
    a later round's is asked of them), not merely the one its server claims."""

    async def check(state_round: int, tensors: Mapping[str, torch.Tensor]) -> str | None:
        if state_round < round_id + 1:
            return f"older than round {round_id + 1}, the state the vote was about"
        want = top_hash
        if state_round > round_id + 1:
            want = await exchange.majority_hash(state_round - 1, participants)
        if want is None:
            return f"no majority of the participants vouches for a round-{state_round} state"
        outer = {n.removeprefix("outer/"): t for n, t in tensors.items() if n.startswith("outer/")}
        got = await asyncio.get_running_loop().run_in_executor(None, weights_hash, outer)
        return None if got == want else f"weights hash {got[:8]}, the majority's is {want[:8]}"

    return check
