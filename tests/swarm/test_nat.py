"""Peers behind NAT on loopback (issue 22, item 4): a peer whose advertised address cannot be
dialled back (`--advertise http://127.0.0.1:1`) or that says so (`--reachable no`) joins
with only `--bootstrap`, is reached through two relays, and trains like the others: its
contributions are applied by every peer and it ends with their weights hash; a pipeline
stage behind NAT serves its hops over the relay. The real NAT (a namespace with nftables
masquerade): `test_nat_netns.py`."""

import statistics

import aiohttp
from conftest import peer_config, run_async, start_swarm, stop_all, wait_until
from test_pipeline_swarm import config as stage_config
from test_pipeline_swarm import start as start_pipeline

from shoal.peer.node import Peer

UNREACHABLE = "http://127.0.0.1:1"  # nothing listens there: the dial-back fails at once


async def api_swarm(url: str) -> dict:
    """What the dashboard's `/api/swarm` serves (over HTTP: these peers share our loop)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/api/swarm", timeout=aiohttp.ClientTimeout(10)) as resp:
            assert resp.status == 200
            return await resp.json()


async def dashboard(url: str, with_csp: bool = False):
    async with aiohttp.ClientSession() as session:
        url = url if url.endswith("/") else url + "/"
        async with session.get(url, timeout=aiohttp.ClientTimeout(10)) as resp:
            assert resp.status == 200
            page = await resp.text()
            return (page, resp.headers.get("Content-Security-Policy", "")) if with_csp else page


def round_seconds(peer: Peer) -> float:
    times = [entry["time"] for entry in peer.round_log]
    return statistics.median(b - a for a, b in zip(times, times[1:], strict=False))


def test_a_replica_behind_nat_trains_through_relays(corpus):
    async def scenario():
        rounds = 4
        peers = await start_swarm(corpus, 2, max_rounds=rounds, min_peers=3)
        nat = Peer(
            peer_config(
                corpus,
                "behind-nat",
                bootstrap=peers[1].address,
                advertise=UNREACHABLE,
                max_rounds=rounds,
                min_peers=3,
            )
        )
        everyone = [*peers, nat]
        try:
            await nat.start()
            me = nat.membership.me
            # client mode is up before the peer trains: relays chosen, address advertised
            assert nat.agent.reachable is False and nat.tunnel is not None
            assert sorted(me.relayed_by.split(",")) == ["peer-0", "peer-1"]
            primary = me.relayed_by.split(",")[0]
            relay = next(p for p in peers if p.peer_id == primary)
            assert me.address == f"{relay.address}/relay/behind-nat"
            await wait_until(
                lambda: all(p.finished.is_set() for p in everyone), 90, f"{rounds} rounds"
            )
            for peer in everyone:
                assert peer.error is None, (peer.peer_id, peer.error)
                assert peer.outer_round == rounds
            # its contributions were pulled through the relay and applied by the others
            for peer in peers:
                applied = [entry["applied"] for entry in peer.round_log]
                assert all("behind-nat" in a for a in applied), (peer.peer_id, applied)
            final = {p.peer_id: p.round_log[-1]["weights_hash"] for p in everyone}
            assert len(set(final.values())) == 1, final
            assert sum(p.traffic.received["relay"] for p in peers) > 0
            # every peer's table, dashboard and API know it is behind NAT
            for peer in peers:
                assert peer.membership.peers["behind-nat"].relayed_by == me.relayed_by
            view = {p["peer_id"]: p for p in (await api_swarm(peers[0].address))["peers"]}
            assert view["behind-nat"]["relayed_by"] == me.relayed_by
            assert view["peer-0"]["relayed_by"] is None
            assert "behind NAT · relayed by peer-" in await dashboard(peers[0].address)
            # its own dashboard, through its relay (sandboxed: served from the relay's origin)
            page, csp = await dashboard(me.address + "/", with_csp=True)
            assert "<code>behind-nat</code> (this peer)" in page and csp.startswith("sandbox")
            print(
                "\nmedian round: "
                + ", ".join(f"{p.peer_id} {round_seconds(p):.2f} s" for p in everyone)
                + f"; relay traffic at {primary}: "
                f"{relay.traffic.received['relay'] + relay.traffic.sent['relay']} bytes"
            )
        finally:
            await stop_all(everyone)

    run_async(scenario(), 150)


def test_a_pipeline_stage_behind_nat_serves_its_hops_through_a_relay(corpus):
    async def scenario():
        specs = [("full-0", "replica", None), ("stage-0", "stage", 0)]
        peers = await start_pipeline(corpus, specs, stages=2, max_rounds=2, min_peers=3)
        nat = Peer(
            stage_config(
                corpus,
                "stage-1",
                peers[0].address,
                stages=2,
                role="stage",
                stage=1,
                reachable="no",
                max_rounds=2,
                min_peers=3,
            )
        )
        everyone = [*peers, nat]
        try:
            await nat.start()
            assert nat.membership.me.relayed_by is not None
            assert nat.agent.reachable is None  # --reachable no: not even asked
            await wait_until(lambda: all(p.finished.is_set() for p in everyone), 120, "2 rounds")
            for peer in everyone:
                assert peer.error is None, (peer.peer_id, peer.error)
                assert peer.outer_round == 2
                assert sorted(peer.round_log[-1]["applied"]) == ["full-0", "stage-0", "stage-1"]
            # the hops reached it (through its relays: it has no other address)
            assert nat.traffic.received["forward"] > 0 and nat.traffic.received["backward"] > 0
            assert sum(p.traffic.received["relay"] for p in peers) > nat.traffic.received["forward"]
            # its slice agrees with the full replica's
            full = peers[0].engine.outer.params
            for name, tensor in nat.engine.outer.params.items():
                assert tensor.equal(full[name]), name
            view = {p["peer_id"]: p for p in (await api_swarm(peers[0].address))["peers"]}
            assert view["stage-1"]["relayed_by"] == nat.membership.me.relayed_by
        finally:
            await stop_all(everyone)

    run_async(scenario(), 150)
