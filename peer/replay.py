"""The replay cache: a request is accepted once, however often it is sent.

The clock-skew check alone lets a recorded request be played again for `window_s` (300 s by
default): a replayed `/stage/step` would step a stage on a partly accumulated gradient. So
every request carries a random nonce under its MAC (`peer.envelope`), and the server keeps
the (sender, nonce) pairs it accepted until their timestamp leaves the window, after which
the skew check refuses a replay by itself. A repeated pair is an `AuthError` (401): the
message is authentic but not fresh, which is an authentication failure like a stale time.

Bounded, so that no flood grows it: at most `max_senders` senders (1,024) and `max_nonces`
pairs in all (65,536: about 13 MB when full, measured; one sender alone can send a request
every 5 ms before its oldest pairs are evicted). Forgetting a pair that has not expired
would let its request be replayed, so eviction instead raises a floor: a request stamped at
or before it is refused as possibly replayed (a 401 that the sender's next request,
stamped later, passes).

* Too many pairs: the sender holding the most loses its oldest pair and its own floor
  rises to that pair's time, so a flooding sender slows itself and no one else.
* Too many senders: senders with nothing unexpired are dropped; else the one whose newest
  request is oldest goes, and the floor for everyone rises to that request's time, the
  least any choice can raise it, and never past the present: senders stamped in the
  future would otherwise let one key holder lock every peer out for the whole window.
  The price: a forgotten sender's requests stamped ahead of our clock could be replayed
  until our clock passes their stamps (an honest peer's clock runs ahead by seconds if at
  all; a key holder could as well sign new ones, as long as the key is shared).

Only authenticated requests reach it (the MAC is checked first), so with a swarm key only a
key holder can make it evict anything.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.peer.errors import AuthError

MAX_SENDERS = 1024
MAX_NONCES = 65_536


@dataclass
class _Sender:
    """One sender's unexpired nonces, oldest stamp first in `heap`."""

    heap: list[tuple[float, str]] = field(default_factory=list)
    nonces: set[str] = field(default_factory=set)
    floor: float = -math.inf
    newest: float = -math.inf


class ReplayCache:
    def __init__(
        self,
        window_s: float,
        *,
        max_senders: int = MAX_SENDERS,
        max_nonces: int = MAX_NONCES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_s = window_s
        self.max_senders = max_senders
        self.max_nonces = max_nonces
        self.clock = clock
        self.floor = -math.inf  # raised when a sender with unexpired nonces is forgotten
        self._senders: dict[str, _Sender] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def admit(self, sender: str, nonce: str, stamp: float) -> None:
        """Accept (sender, nonce) stamped `stamp` once; AuthError if it was accepted before
        or is stamped at or before a floor. Call it after authenticating the message and
        before acting on it."""
        now = self.clock()
        seen = self._senders.get(sender)
        if stamp <= max(self.floor, seen.floor if seen else -math.inf):
            raise AuthError(
                "request stamped before what this peer can still tell from a replay "
                "(its replay cache overflowed); a fresh request passes"
            )
        if seen is None:
            seen = self._senders[sender] = self._new_sender(now)
        else:
            self._expire(seen, now)
        if nonce in seen.nonces:
            raise AuthError("replayed request: this nonce was already accepted from this sender")
        heapq.heappush(seen.heap, (stamp, nonce))
        seen.nonces.add(nonce)
        seen.newest = max(seen.newest, stamp)
        self._count += 1
        while self._count > self.max_nonces:
            self._evict_nonce(now)

    def _expire(self, seen: _Sender, now: float) -> None:
        """Drop the pairs the skew check refuses by itself now."""
        while seen.heap and seen.heap[0][0] < now - self.window_s:
            _, nonce = heapq.heappop(seen.heap)
            seen.nonces.discard(nonce)
            self._count -= 1

    def _new_sender(self, now: float) -> _Sender:
        if len(self._senders) >= self.max_senders:
            for sender, seen in list(self._senders.items()):
                if seen.newest < now - self.window_s:
                    self._count -= len(seen.nonces)
                    del self._senders[sender]
        if len(self._senders) >= self.max_senders:
            sender = min(self._senders, key=lambda s: self._senders[s].newest)
            gone = self._senders.pop(sender)
            self.floor = max(self.floor, min(max(gone.newest, gone.floor), now))
            self._count -= len(gone.nonces)
        return _Sender()

    def _evict_nonce(self, now: float) -> None:
        seen = max(self._senders.values(), key=lambda s: len(s.nonces))
        self._expire(seen, now)
        if seen.heap and self._count > self.max_nonces:
            stamp, nonce = heapq.heappop(seen.heap)
            seen.nonces.discard(nonce)
            seen.floor = max(seen.floor, stamp)
            self._count -= 1
