"""The two votes of a round (`peer.rounds` steps 3 and 4): the set of peer ids a peer holds,
and its weights hash after the outer step, with compact answers when the asker agrees.

    POST /round/set   {round, wait_s[, same_as]}  → {round, peers} | {round, same: true} | 404
    POST /round/hash  {round, wait_s[, same_as]}  → {round, hash} | {round, same: true} | 404

Every peer asks every voter, so the answers cost O(N) per peer for the hashes and O(N²) for
the sets (N ids each). Most voters agree with the asker, so the asker sends `same_as`, the
`DIGEST_BYTES`-byte digest of its own published vote for that round (`set_digest`,
`hash_digest`), and a voter whose own vote has the same digest answers `{round, same: true}`
instead of repeating it; any other voter answers in full, as does every voter to an asker
that sends no digest (it has published nothing for that round yet: `majority_hash` asks about
a round it may not have voted in). The asker counts a "same" answer as a vote for exactly
its own set or hash, so the decision (`decide_set`, the hash majority) is unchanged. A voter
that lies with "same" could as well have lied with a full copy of the asker's vote: both
are its signed answer. A digest is a 128-bit prefix of sha256, so an answerer cannot find a
vote other than the asker's that answers "same" honestly. A `same_as` that is not bytes of
exactly `DIGEST_BYTES` is refused (400); a "same" to an asker that sent no digest counts as
no answer.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from typing import Any

from shoal.peer.errors import NotFound, ProtocolError
from shoal.peer.roundstore import RoundStore, check_round_request

DIGEST_BYTES = 16  # of sha256: collisions out of reach (2^64 work for a birthday pair)


def set_digest(peer_ids: Iterable[str]) -> bytes:
    """The digest of a set of peer ids: order and repeats do not matter (votes are sets);
    each id is length-prefixed, so no two sets share an encoding."""
    digest = hashlib.sha256()
    for peer_id in sorted(set(peer_ids)):
        encoded = peer_id.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(4, "big") + encoded)
    return digest.digest()[:DIGEST_BYTES]


def hash_digest(weights_hash: str) -> bytes:
    """The digest of a weights hash (any string: the vote is compared as published)."""
    return hashlib.sha256(weights_hash.encode("utf-8", "surrogatepass")).digest()[:DIGEST_BYTES]


def check_same_as(payload: dict[str, Any]) -> bytes | None:
    """The asker's `same_as` digest (server side): absent is None, anything but bytes of
    exactly `DIGEST_BYTES` is a ProtocolError."""
    if "same_as" not in payload:
        return None
    same_as = payload["same_as"]
    if not isinstance(same_as, bytes) or len(same_as) != DIGEST_BYTES:
        raise ProtocolError(f"same_as must be {DIGEST_BYTES} bytes")
    return same_as


def set_answer(round_id: int, peer_ids: list[str], same_as: bytes | None) -> dict[str, Any]:
    """`/round/set`'s answer for our published `peer_ids`, to an asker whose set has
    digest `same_as` (None: unknown)."""
    if same_as is not None and set_digest(peer_ids) == same_as:
        return {"round": round_id, "same": True}
    return {"round": round_id, "peers": peer_ids}


def hash_answer(round_id: int, weights_hash: str, same_as: bytes | None) -> dict[str, Any]:
    """`/round/hash`'s answer for our published `weights_hash` (as `set_answer`)."""
    if same_as is not None and hash_digest(weights_hash) == same_as:
        return {"round": round_id, "same": True}
    return {"round": round_id, "hash": weights_hash}


async def serve_set(store: RoundStore, payload: dict[str, Any]) -> dict[str, Any]:
    """`/round/set`: the set we published for round r, once we have (404 after `wait_s`)."""
    round_id, peer_ids, same_as = await _published(store.sets, store, payload, "set")
    return set_answer(round_id, peer_ids, same_as)


async def serve_hash(store: RoundStore, payload: dict[str, Any]) -> dict[str, Any]:
    """`/round/hash`: the weights hash we published for round r (as `serve_set`)."""
    round_id, weights_hash, same_as = await _published(store.hashes, store, payload, "hash")
    return hash_answer(round_id, weights_hash, same_as)


async def _published(
    table: dict[int, Any], store: RoundStore, payload: dict[str, Any], what: str
) -> tuple[int, Any, bytes | None]:
    """(round, what we published in `table` for it, the asker's `same_as`), waiting for
    it; NotFound after `wait_s`. The request is checked before any wait."""
    round_id, wait_s = check_round_request(payload)
    same_as = check_same_as(payload)
    value = await store.wait_for(lambda: table.get(round_id), wait_s)
    if value is None:
        raise NotFound(f"no round-{round_id} {what} yet")
    return round_id, value, same_as


def set_request(round_id: int, mine: list[str] | None) -> dict[str, Any]:
    """The `/round/set` request of an asker whose own published set is `mine` (None if it
    has published none for round r)."""
    if mine is None:
        return {"round": round_id}
    return {"round": round_id, "same_as": set_digest(mine)}


def hash_request(round_id: int, mine: str | None) -> dict[str, Any]:
    """The `/round/hash` request of an asker whose own published hash is `mine` (or None)."""
    if mine is None:
        return {"round": round_id}
    return {"round": round_id, "same_as": hash_digest(mine)}


def voted_set(answer: dict[str, Any] | None, mine: list[str] | None) -> set[str] | None:
    """The set a `/round/set` answer (already checked for its round) votes for: ours for
    "same" (if we sent our digest), its list of ids otherwise; None if it holds neither."""
    if answer is None:
        return None
    if answer.get("same") is True:
        return set(mine) if mine is not None else None
    peer_ids = answer.get("peers")
    if isinstance(peer_ids, list) and all(isinstance(i, str) for i in peer_ids):
        return set(peer_ids)
    return None


def voted_hash(answer: dict[str, Any] | None, mine: str | None) -> str | None:
    """The weights hash a `/round/hash` answer votes for (as `voted_set`)."""
    if answer is None:
        return None
    if answer.get("same") is True:
        return mine
    weights_hash = answer.get("hash")
    return weights_hash if isinstance(weights_hash, str) else None


def decide_set(votes: dict[str, set[str]]) -> tuple[set[str], dict[str, str]]:
    """The round's set from the sets the voters published (ours among them): every id held
    by more than half of the voters, less the voters whose own set holds fewer than half of
    those (implausibly small: a peer trying to veto the round, or one that reached almost
    nobody), returned with the reason for each. Every peer that obtained the same sets
    decides the same; from three voters on, one peer publishing an empty set removes only
    itself. Strictly more than half: a joiner that only half of the peers know of is left
    out by all (with "at least half" four peers once split into two pairs of hashes).
    Two voters can only agree on what both hold, as under the intersection."""
    counts = Counter(i for ids in votes.values() for i in ids)
    chosen = {i for i, n in counts.items() if 2 * n > len(votes)}
    flagged = {
        voter: f"its set holds {len(ids & chosen)} of the {len(chosen)} the majority holds"
        for voter, ids in votes.items()
        if 2 * len(ids & chosen) < len(chosen)
    }
    return chosen - set(flagged), flagged
