"""Client mode: a peer behind NAT, reached through relays (the relay side and the messages
are `peer.relay`'s).

Who is in client mode: at `/join` the peer joined calls the joiner back at its advertised
address (`dial_back`: `POST /ping` within `dial_back_timeout_s`, whose answer must be signed
by the joiner's key) and says whether that worked (`reachable` in the join answer).
`--reachable auto` trusts that answer, `no` is client mode without asking, `yes` never is;
the first peer of a run is reachable by definition (`needs_client_mode`).

In client mode, `RelayTunnel`, before the peer builds its model:
- chooses two relays among the live peers not themselves relayed, by rendezvous hashing of
  (our id, their id) (`choose_relays`: deterministic, and spread evenly over the swarm);
- registers at each with a poll of wait 0 (a relay that does not answer within
  `dial_back_timeout_s` is passed over), then keeps one long poll open per relay;
- replays each request a poll brings against its own server over loopback, concurrently,
  and posts the raw answer back (`/relay/answer`; a local failure is answered 502);
- advertises the primary relay's URL as its address and both ids as `relayed_by`, and tells
  every live peer at once (`announce`);
- replaces a relay after `relay_failures` consecutive failed polls, an authenticated
  refusal, or when membership declares it dead: the other one becomes the primary
  (re-advertised), a new one is chosen, and the old one is not chosen for `relay_ban_s`.
The tunnel's own polls and answers are counted in its own Traffic (`tunnel.traffic`), not
the peer's: the requests it replays are counted by the peer's server, as if direct.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict

from shoal.peer.bodies import read_capped
from shoal.peer.client import PeerClient, PeerUnreachable, Traffic
from shoal.peer.errors import PayloadTooLarge, ProtocolError, ShoalError
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.protocol_config import ProtocolConfig
from shoal.peer.relay import Relayed, RelayedAnswer, relayed_headers
from shoal.peer.tasks import TaskOwner
from shoal.peer.wire import WireCodec

if TYPE_CHECKING:
    from shoal.peer.agent import MembershipAgent
    from shoal.peer.config import NetworkConfig

log = logging.getLogger(__name__)

RELAYS = 2
MAX_ADDRESS_CHARS = 256  # a peer entry's address field (peer.membership)


def needs_client_mode(reachable: str, bootstrap: str | None, dialed_back: bool | None) -> bool:
    """`--reachable` and the dial-back's verdict (None: not asked, or not answered)."""
    if reachable == "no":
        return True
    if reachable == "yes" or bootstrap is None:
        return False
    return dialed_back is False


def relay_address(relay: PeerInfo, peer_id: str) -> str:
    return f"{relay.address.rstrip('/')}/relay/{peer_id}"


def choose_relays(peer_id: str, candidates: Iterable[PeerInfo], count: int) -> list[str]:
    """Up to `count` relay ids for `peer_id`, best first: rendezvous hashing over the
    candidates that are not relayed themselves (and whose relay URL fits an entry)."""
    eligible = [
        p.peer_id
        for p in candidates
        if p.relayed_by is None
        and p.peer_id != peer_id
        and len(relay_address(p, peer_id)) <= MAX_ADDRESS_CHARS
    ]
    score = lambda rid: hashlib.sha256(f"{peer_id}\n{rid}".encode()).digest()  # noqa: E731
    return sorted(eligible, key=score, reverse=True)[:count]


def local_url(listen_host: str, port: int) -> str:
    """Where this peer's own server answers on this machine."""
    host = listen_host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


async def dial_back(client: PeerClient, entry: PeerInfo, timeout_s: float) -> bool:
    """Whether the joiner of `entry` answers at its advertised address, as itself."""
    try:
        answer = await client.call(
            entry.address, "POST", "/ping", {}, timeout_s=timeout_s, joining=True
        )
    except ShoalError as exc:
        log.info("[%s] dial-back to %s failed: %s", client.wire.peer_id, entry.address, exc)
        return False
    return answer.sender == entry.peer_id and answer.key == entry.pubkey


async def join_swarm(
    agent: MembershipAgent, network: NetworkConfig, tasks: TaskOwner, port: int
) -> tuple[int, RelayTunnel | None]:
    """Join through --bootstrap (the first peer founds the run, at round 0), then enter
    client mode if `needs_client_mode`; the run's round, and the tunnel if any."""
    if network.bootstrap is None:
        return 0, None
    joined_round = await agent.join(network.bootstrap, dial_back=network.reachable == "auto")
    if not needs_client_mode(network.reachable, network.bootstrap, agent.reachable):
        return joined_round, None
    why = "--reachable no" if network.reachable == "no" else "the dial-back failed"
    log.warning(
        "[%s] not reachable at %s (%s): client mode, reached through relays",
        agent.peer_id,
        agent.me.address,
        why,
    )
    url = local_url(network.listen_host, port)
    tunnel = RelayTunnel(agent.membership, agent.wire, agent.protocol, tasks, url, agent.announce)
    await tunnel.start()
    return joined_round, tunnel


class RelayTunnel:
    def __init__(
        self,
        membership: Membership,
        wire: WireCodec,
        protocol: ProtocolConfig,
        tasks: TaskOwner,
        local_url: str,
        announce: Callable[[], Awaitable[Any]],
    ) -> None:
        self.membership, self.protocol, self.tasks = membership, protocol, tasks
        self.local_url, self.announce = local_url, announce
        self.peer_id = membership.me.peer_id
        self.client = PeerClient(  # its own connections and counters (module doc)
            wire,
            Traffic(),
            request_timeout_s=protocol.request_timeout_s,
            max_response_bytes=protocol.max_response_bytes,
        )
        self.relays: dict[str, asyncio.Future] = {}  # relay id → its poll loop; primary first
        self.banned: dict[str, float] = {}  # relay id → when it was replaced
        self._local: aiohttp.ClientSession | None = None

    @property
    def traffic(self) -> Traffic:
        return self.client.traffic

    async def start(self) -> None:
        """Register with relays and advertise the primary's URL (ShoalError if no relay
        answers); then keep the relays up in the background."""
        await self.client.start()
        self._local = aiohttp.ClientSession(auto_decompress=False)
        try:
            await self.refresh()
            if not self.relays:
                raise ShoalError(
                    "client mode: no reachable peer answered as a relay (every peer of the run "
                    "is behind NAT, or they refuse: --relay-max-clients)"
                )
        except BaseException:
            await self._close()
            raise
        await self.announce()
        self.tasks.spawn(self._supervise(), name="relay tunnel", fatal=True)

    async def refresh(self) -> bool:
        """Drop lost relays, fill up to RELAYS, advertise; True if our address changed."""
        now = time.monotonic()
        for rid, loop in list(self.relays.items()):
            if loop.done() or not self.membership.is_alive(rid):
                loop.cancel()
                del self.relays[rid]
                self.banned[rid] = now
                log.warning("[%s] relay %s lost: replacing it", self.peer_id, rid)
        self.banned = {r: t for r, t in self.banned.items() if now - t < self.protocol.relay_ban_s}
        if len(self.relays) < RELAYS:
            candidates = [
                p
                for p in self.membership.live_others()
                if p.peer_id not in self.relays and p.peer_id not in self.banned
            ]
            for rid in choose_relays(self.peer_id, candidates, 2 * RELAYS):
                if len(self.relays) >= RELAYS:
                    break
                if await self._register(rid):
                    self.relays[rid] = self.tasks.spawn(self._poll(rid), name=f"relay poll {rid}")
                else:
                    self.banned[rid] = now
        return self._advertise()

    def _advertise(self) -> bool:
        me = self.membership.me
        primary = next((self.membership.peers.get(r) for r in self.relays), None)
        if primary is None:  # keep the last address: its relay may come back
            log.warning("[%s] behind NAT with no relay: unreachable for now", self.peer_id)
            return False
        address, relayed_by = relay_address(primary, self.peer_id), ",".join(self.relays)
        if (me.address, me.relayed_by) == (address, relayed_by):
            return False
        me.address, me.relayed_by = address, relayed_by
        self.membership.revise()
        log.info("[%s] behind NAT: reached at %s (relays %s)", self.peer_id, address, relayed_by)
        return True

    async def _supervise(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.protocol.heartbeat_interval_s)
                if await self.refresh():
                    await self.announce()
        finally:
            for loop in self.relays.values():
                loop.cancel()
            await self._close()

    async def _close(self) -> None:
        await self.client.close()
        if self._local is not None:
            await self._local.close()
            self._local = None

    async def _register(self, rid: str) -> bool:
        try:
            await self._poll_once(rid, 0.0, self.protocol.dial_back_timeout_s)
            return True
        except ShoalError as exc:
            log.info("[%s] relay %s passed over: %s", self.peer_id, rid, exc)
            return False

    async def _poll(self, rid: str) -> None:
        """One relay's long polls, until it fails `relay_failures` times in a row or refuses."""
        failures, wait_s = 0, self.protocol.relay_poll_s
        while failures < self.protocol.relay_failures:
            try:
                await self._poll_once(rid, wait_s, wait_s + self.protocol.request_timeout_s)
                failures = 0
            except PeerUnreachable as exc:
                failures += 1
                log.info("[%s] poll at relay %s failed: %s", self.peer_id, rid, exc)
                await asyncio.sleep(min(1.0, self.protocol.heartbeat_interval_s))
            except ShoalError as exc:  # an authenticated refusal: full, or relayed itself
                log.warning("[%s] relay %s refuses: %s", self.peer_id, rid, exc)
                return
        log.warning("[%s] relay %s failed %d polls in a row", self.peer_id, rid, failures)

    async def _poll_once(self, rid: str, wait_s: float, timeout_s: float) -> None:
        relay = self.membership.peers.get(rid)
        if relay is None:
            raise PeerUnreachable(f"relay {rid} left the table")
        answer = await self.client.call(
            relay.address, "POST", "/relay/poll", {"wait_s": wait_s}, timeout_s=timeout_s
        )
        requests = answer.payload.get("requests")
        if not isinstance(requests, list) or len(requests) > self.protocol.relay_batch:
            raise ProtocolError(f"relay {rid} answered a poll with no list of requests")
        for item in requests:
            self.tasks.spawn(self._serve(rid, item), name="relayed request")

    async def _serve(self, rid: str, item: Any) -> None:
        """Replay one relayed request locally and post its answer back."""
        try:
            request = Relayed.from_wire(item, self.protocol.max_response_bytes)
        except (ProtocolError, PayloadTooLarge) as exc:
            log.warning("[%s] relay %s sent a malformed request: %s", self.peer_id, rid, exc)
            return
        answer = await self._replay(request)
        relay = self.membership.peers.get(rid)
        if relay is None:
            return
        try:  # bounded as the relayed request is: a large answer on a slow link takes time
            await self.client.call(
                relay.address,
                "POST",
                "/relay/answer",
                {"id": request.id, **answer.to_wire()},
                timeout_s=self.protocol.relay_timeout_s,
            )
        except ShoalError as exc:  # its requester gave up, or the relay is gone
            log.info("[%s] answer to relay %s not taken: %s", self.peer_id, rid, exc)

    async def _replay(self, request: Relayed) -> RelayedAnswer:
        assert self._local is not None, "tunnel not started"
        limit = self.protocol.max_response_bytes
        try:
            async with self._local.request(
                request.method,
                self.local_url + request.path,
                headers=CIMultiDict(request.headers),
                data=request.body,
                timeout=aiohttp.ClientTimeout(total=self.protocol.relay_timeout_s),
                allow_redirects=False,
            ) as resp:
                chunks = await read_capped(resp.content, limit, "its own server's answer")
                return RelayedAnswer(resp.status, relayed_headers(resp.headers), b"".join(chunks))
        except (TimeoutError, aiohttp.ClientError, OSError, PayloadTooLarge) as exc:
            text = f"peer behind NAT: its own server failed: {type(exc).__name__}: {exc}"
            return RelayedAnswer(502, [("Content-Type", "text/plain")], text.encode())
