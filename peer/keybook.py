"""Which key speaks for which peer id: signatures on envelopes and on peer-table entries.

The rule (see `peer.identity` for the keys themselves):
- A derived id (`p-` + 16 base32 chars) belongs to the key it is derived from, anywhere.
- Any other id (a `--peer-id` name) is bound, at each peer, to the first key that proved it
  holds it (a valid signature on an envelope or an entry naming that id); from then on a
  message or an entry naming that id under another key is refused (401) or dropped, and
  the first refusal per id and key is logged as a WARNING. Bindings are never forgotten
  while the peer runs: a named peer that restarts must keep its key (`--identity`), or
  take a new name. First-come binding cannot stop a key holder who claims a name before
  its owner ever spoke; derived ids can, which is why they are the default.
- With `--allow-peers`, a key not on the list is refused (403) whatever id it claims.

An envelope is checked after its MAC, swarm id and time (cheap checks first): its
X-Shoal-Sig must verify under its X-Shoal-Key over `envelope.signed_bytes`, then the key
must be allowed and bound to X-Shoal-Peer. An entry is checked before it is merged
(`Membership.take`): its `sig` must verify under its `pubkey` over `entry_bytes`, then the
same key rule applies to its `peer_id`. Verified entries are remembered (bounded), so the
same copy arriving from several relayers costs one verification.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from shoal.peer.envelope import Fields, show, signed_bytes
from shoal.peer.errors import AuthError, Forbidden, ShoalError
from shoal.peer.identity import derived_id, fingerprint, is_derived, verify
from shoal.peer.membership import PeerInfo, entry_bytes

log = logging.getLogger(__name__)

MAX_BOUND_IDS = 65_536  # ids bound to keys at one peer: past it, new ids are refused
MAX_VERIFIED = 4096  # verified entry copies remembered
WARN_EVERY_S = 60.0  # a dropped entry's reason is logged at most this often


class KeyBook:
    def __init__(
        self,
        owner: str,
        allowed: frozenset[bytes] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.owner = owner  # our peer id, for log lines
        self.allowed = allowed
        self.clock = clock
        self.bound: dict[str, bytes] = {}
        self.dropped_entries = 0
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._warned: dict[tuple[str, str], float] = {}

    def key_of(self, peer_id: str) -> bytes | None:
        return self.bound.get(peer_id)

    def admit(self, peer_id: str, public_key: bytes) -> None:
        """Check that `public_key` (which just proved it holds its private key) may speak for
        `peer_id`, and bind them if the id is new here. Forbidden: not on the allow-list;
        AuthError: the id belongs to another key."""
        if self.allowed is not None and public_key not in self.allowed:
            raise Forbidden(
                f"key {fingerprint(public_key)} (peer {show(peer_id)}) is not on this run's "
                "--allow-peers list"
            )
        if is_derived(peer_id) and derived_id(public_key) != peer_id:
            raise AuthError(
                f"peer id {show(peer_id)} is not derived from its key {fingerprint(public_key)}"
            )
        bound = self.bound.get(peer_id)
        if bound is None:
            if len(self.bound) >= MAX_BOUND_IDS:
                raise AuthError(f"this peer already knows {MAX_BOUND_IDS} identities")
            self.bound[peer_id] = public_key
        elif bound != public_key:
            self._warn(
                peer_id,
                fingerprint(public_key),
                "refusing peer id %s claimed by key %s: it is bound to key %s",
                fingerprint(bound),
            )
            raise AuthError(
                f"peer id {show(peer_id)} is bound to another key ({fingerprint(bound)}), "
                f"not {fingerprint(public_key)}"
            )

    def check_envelope(self, method: str, path: str, fields: Fields, digest: bytes) -> None:
        """Authenticate an envelope's sender (AuthError, Forbidden); see the module doc."""
        if fields.key is None or fields.sig is None:
            raise AuthError("unsigned message: X-Shoal-Key and X-Shoal-Sig are required")
        public_key = bytes.fromhex(fields.key)  # the shape was checked: 64 hex digits
        data = signed_bytes(method, path, fields.signed, digest)
        if not verify(public_key, bytes.fromhex(fields.sig), data):
            raise AuthError(f"bad signature from {show(fields.sender)} (key {fields.key[:16]})")
        self.admit(fields.sender, public_key)

    def check_entry(self, info: PeerInfo) -> bool:
        """Whether a peer-table entry from the network is its owner's (signed by the key
        that owns its id); a failing one is counted and logged, at most every 60 s per id."""
        reason = self._entry_fault(info)
        if reason is None:
            return True
        self.dropped_entries += 1
        self._warn(info.peer_id, reason, "dropped the entry of %s: %s%s", "")
        return False

    def _entry_fault(self, info: PeerInfo) -> str | None:
        if info.pubkey is None or info.sig is None:
            return "unsigned"
        content = entry_bytes(info)
        memo = hashlib.sha256(content + bytes.fromhex(info.sig)).digest()
        if memo not in self._verified:
            if not verify(bytes.fromhex(info.pubkey), bytes.fromhex(info.sig), content):
                return "bad signature (forged or altered by a relayer)"
            self._verified[memo] = None
            if len(self._verified) > MAX_VERIFIED:
                self._verified.popitem(last=False)
        try:
            self.admit(info.peer_id, bytes.fromhex(info.pubkey))
        except ShoalError as exc:
            return str(exc)
        return None

    def _warn(self, peer_id: str, what: str, message: str, extra: str) -> None:
        """Log a refusal as a WARNING once per (id, what) every WARN_EVERY_S; bounded."""
        now, key = self.clock(), (peer_id, what)
        if now - self._warned.get(key, -WARN_EVERY_S) < WARN_EVERY_S:
            return
        if len(self._warned) >= MAX_VERIFIED:
            self._warned.clear()
        self._warned[key] = now
        log.warning("[%s] " + message, self.owner, show(peer_id), what, extra)
