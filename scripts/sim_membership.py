"""Membership gossip at scale, in one process and in minutes: N membership agents over a
simulated network and clock (no sockets, no torch), running the peer's own code for the
table (`peer.membership.Membership`) and its messages (`peer.gossip.Gossip`).

    python scripts/sim_membership.py --peers 10 30 100 300 1000 --out results/sim_membership.json

Each agent does what `MembershipAgent.gossip_forever` does every `heartbeat_interval_s`
(from a random phase): refresh its counters, beat, probe the next peer of its ring
(directly, then through `INDIRECT` others; a peer none reaches is suspected and the news
spread at once), probe one dead peer, and spread fresh news to `gossip_fanout` peers
(receivers that find it fresh spread it on 10 ms later). An exchange is the real message
sequence (probe with news, answer, wanted entries, and the digest exchange of
anti-entropy when the table sums differ), each message msgpack-encoded and decoded as on
the wire (its encoded size is what is counted; the envelope's headers are not), delivered
at once: the network's latency (ms) is small against a heartbeat. A dead peer's
connection is refused: nothing crosses. Entries look like a training peer's
(64-hex weights hash, losses, counters); every peer's traffic counters grow every beat and
its round moves every `--round-s` seconds (staggered), so revisions happen as in a run.

Tables start converged (everyone knows everyone). After `--warmup-s`, one new peer joins
(`/join` through a random peer: the whole table, once) and one peer dies; reported:
- `join_known_s`: until every live peer holds the newcomer as alive;
- `death_known_s`: until every live peer sees the dead one as dead (`dead_after_s` is 6 s
  of it: a peer must stay quiet that long);
- `bytes_per_peer_s`: gossip bytes sent per peer per second, mean over all peers from
  `--warmup-s` / 2 on (the join's own table transfer not counted);
- `whole_table_bytes_per_peer_s`: the same for the first protocol (every exchange sent
  the whole table both ways): 2 × fanout × the table's encoded size / interval, computed
  from the same converged table;
- `digest_bytes_per_peer_s`: the same for the second (a digest of every entry to fanout
  peers a heartbeat): 2 × fanout × the digest's encoded size / interval;
- `max_suspect_share`, `false_dead`: from the events on, every 0.1 s, 5 random live peers
  look at every live peer they know: the largest share they saw as suspect or dead, and
  how many times one saw a live peer as dead (0 and 0: no false suspicion).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import msgpack

from shoal.peer.agent import ANTI_ENTROPY_BEATS, INDIRECT
from shoal.peer.gossip import Gossip
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.protocol_config import ProtocolConfig

EPOCH = 1_733_000_000.0  # incarnations are start times: realistic float64s


def wire(message: dict) -> tuple[dict, int]:
    """The message as the receiver decodes it, and its encoded size."""
    raw = msgpack.packb(message, use_bin_type=True)
    return msgpack.unpackb(raw, raw=False, strict_map_key=True), len(raw)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class SimPeer:
    def __init__(self, index: int, clock: Clock, protocol: ProtocolConfig, seed: int) -> None:
        rng = random.Random(seed * 1_000_003 + index)
        pid = f"peer-{rng.getrandbits(32):08x}"
        me = PeerInfo(
            pid,
            f"http://10.{index // 65536}.{index // 256 % 256}.{index % 256}:7000",
            incarnation=EPOCH + rng.random() * 100,
            devices="cpu",
            phase="training",
            weights_hash=f"{rng.getrandbits(256):064x}",
            train_loss=4.0,
            eval_loss=4.1,
            tokens_per_s=1234.5,
        )
        self.membership = Membership(
            me,
            suspect_after_s=protocol.suspect_after_s,
            dead_after_s=protocol.dead_after_s,
            forget_after_s=protocol.forget_after_s,
            clock=clock,
        )
        self.gossip = Gossip(self.membership, rng)
        self.rng = rng
        self.alive = True
        self.sent = 0
        self.full_at = -1e9

    @property
    def pid(self) -> str:
        return self.membership.me.peer_id

    def refresh_counters(self) -> None:
        """What the node's `before_beat` does: its traffic counters, grown every beat."""
        me = self.membership.me
        me.bytes_sent, me.bytes_received = self.sent, self.sent + 17
        me.loop_lag_ms_max = round(self.rng.uniform(1, 30), 1)

    def next_round(self) -> None:
        me = self.membership.me
        me.round += 1
        me.step += 50
        me.train_loss = round(self.rng.uniform(2, 4), 4)
        me.eval_loss = round(self.rng.uniform(2, 4), 4)
        me.weights_hash = f"{self.rng.getrandbits(256):064x}"


class Sim:
    def __init__(self, n: int, protocol: ProtocolConfig, args) -> None:
        self.protocol, self.args = protocol, args
        self.clock = Clock()
        self.peers = [SimPeer(i, self.clock, protocol, args.seed) for i in range(n)]
        self.by_id = {p.pid: p for p in self.peers}
        for p in self.peers:  # converged tables: everyone knows everyone
            p.membership.take([replace(q.membership.me) for q in self.peers if q is not p])
            p.membership.changed.clear()  # converged: nobody's news
        self.rng = random.Random(args.seed)
        self.events: list = []
        self.seq = 0
        for p in self.peers:
            self.at(self.rng.random() * protocol.heartbeat_interval_s, "beat", p)
            if args.round_s > 0:  # 0: no round moves (the failure detector's cost alone)
                self.at(self.rng.random() * args.round_s, "round", p)
        self.measured_from = args.warmup_s / 2
        self.bytes = 0

    def at(self, t: float, kind: str, peer: SimPeer | None = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, peer))

    def count(self, peer: SimPeer, size: int) -> None:
        peer.sent += size
        if self.clock.t >= self.measured_from:
            self.bytes += size

    def beat(self, peer: SimPeer) -> None:
        """One turn of `MembershipAgent.gossip_forever`."""
        peer.refresh_counters()
        m = peer.membership
        m.beat()
        target = m.next_probe(peer.rng)
        if target is not None:
            self.probe(peer, target)
        dead = m.probe_target(peer.rng)
        if dead is not None:
            held = [dead.peer_id, dead.incarnation, dead.heartbeat, "dead"]
            self.exchange(peer, dead.peer_id, peer.gossip.request(events=[held]))
        self.spread(peer)

    def probe(self, peer: SimPeer, target: PeerInfo) -> None:
        """`MembershipAgent.probe`: directly, then through INDIRECT others."""
        if self.exchange(peer, target.peer_id, peer.gossip.request()):
            return
        m = peer.membership
        helpers = [p for p in m.live_others() if p.peer_id != target.peer_id]
        acked = False
        for helper in peer.rng.sample(helpers, min(INDIRECT, len(helpers))):
            other = self.by_id.get(helper.peer_id)
            if other is None or not other.alive:
                continue
            request, size = wire(peer.gossip.request(probe=target.peer_id))
            self.count(peer, size)
            answer = other.gossip.answer(request)
            answer["acked"] = self.exchange(other, target.peer_id, other.gossip.request())
            answer, answer_size = wire(answer)
            self.count(other, answer_size)
            peer.gossip.take_answer(answer, request)
            acked = acked or answer["acked"]
        if not acked and m.suspect(target.peer_id):
            peer.gossip.spread(target.peer_id, "suspect")
            self.spread(peer, also=target.peer_id)

    def spread(self, peer: SimPeer, also: str | None = None) -> None:
        """`MembershipAgent.spread_fresh`: fresh news to fanout peers at once."""
        if not peer.gossip.fresh:
            return
        peer.gossip.fresh = False
        targets = [
            p.peer_id for p in peer.membership.gossip_targets(self.protocol.gossip_fanout, peer.rng)
        ]
        if also is not None and also not in targets:
            targets.append(also)
        for pid in targets:
            self.exchange(peer, pid, peer.gossip.request())

    def exchange(self, peer: SimPeer, target_id: str, request: dict) -> bool:
        """`MembershipAgent.gossip_with`: False if the target is dead (nothing crosses)."""
        other = self.by_id.get(target_id)
        if other is None or not other.alive:
            return False
        request, size = wire(request)
        self.count(peer, size)
        answer, answer_size = wire(other.gossip.answer(request))
        self.count(other, answer_size)
        push = peer.gossip.take_answer(answer, request)
        if push is not None:
            push, push_size = wire(push)
            self.count(peer, push_size)
            final, final_size = wire(other.gossip.answer(push))
            self.count(other, final_size)
            peer.gossip.take_entries(final)
        peer.membership.touch(target_id)
        other.membership.touch(peer.pid)
        if other.gossip.fresh:
            self.at(self.clock.t + 0.01, "spread", other)
        every_s = ANTI_ENTROPY_BEATS * self.protocol.heartbeat_interval_s
        if peer.gossip.sum_differs and self.clock.t - peer.full_at >= every_s:
            peer.full_at = self.clock.t
            sums, size = wire({"sums": peer.membership.table_sums()})
            self.count(peer, size)
            answer, answer_size = wire(other.gossip.answer(sums))
            self.count(other, answer_size)
            if answer["buckets"]:
                request = peer.gossip.request(full=True, buckets=answer["buckets"])
                self.exchange(peer, target_id, request)
        return True

    def join(self) -> SimPeer:
        newcomer = SimPeer(len(self.peers), self.clock, self.protocol, self.args.seed)
        bootstrap = self.rng.choice([p for p in self.peers if p.alive])
        bootstrap.membership.merge([newcomer.membership.me.to_wire()])  # the /join request
        bootstrap.gossip.fresh = True
        newcomer.membership.merge(wire({"peers": bootstrap.membership.table()})[0]["peers"])
        self.peers.append(newcomer)
        self.by_id[newcomer.pid] = newcomer
        self.at(
            self.clock.t + self.rng.random() * self.protocol.heartbeat_interval_s, "beat", newcomer
        )
        return newcomer

    def run(self) -> dict:
        args, protocol = self.args, self.protocol
        interval = protocol.heartbeat_interval_s
        event_at, end_at = args.warmup_s, args.warmup_s + args.max_wait_s
        self.at(event_at, "events")
        self.at(0.0, "check")
        joiner = victim = None
        join_known = death_known = None
        max_suspect, false_dead = 0.0, 0
        while self.events:
            t, _, kind, peer = heapq.heappop(self.events)
            self.clock.t = t
            if kind == "beat":
                if peer.alive:
                    self.beat(peer)
                    self.at(t + interval, "beat", peer)
            elif kind == "spread":
                if peer.alive:
                    self.spread(peer)
            elif kind == "round":
                peer.next_round()
                self.at(t + args.round_s, "round", peer)
            elif kind == "events":
                victim = self.rng.choice(self.peers)
                victim.alive = False
                joiner = self.join()
            elif kind == "check":
                live = [p for p in self.peers if p.alive]
                for observer in self.rng.sample(live, min(5, len(live))):
                    if t < event_at:
                        break  # tables start converged but not yet heard from: not steady
                    m = observer.membership
                    known = [p for p in live if p is not observer and p.pid in m.peers]
                    statuses = [m.status(p.pid) for p in known]
                    quiet = sum(s != "alive" for s in statuses)
                    max_suspect = max(max_suspect, quiet / max(1, len(live) - 1))
                    false_dead += statuses.count("dead")
                if joiner is not None and join_known is None:
                    if all(p.membership.is_alive(joiner.pid) for p in live):
                        join_known = t - event_at
                if victim is not None and death_known is None:
                    if all(not p.membership.is_alive(victim.pid) for p in live):
                        death_known = t - event_at
                done = join_known is not None and death_known is not None
                if t >= end_at or (done and t >= event_at + args.min_after_s):
                    break
                self.at(t + 0.1, "check")
        seconds = self.clock.t - self.measured_from
        return {
            "join_known_s": _round(join_known),
            "death_known_s": _round(death_known),
            "bytes_per_peer_s": round(self.bytes / (len(self.peers) * seconds)),
            "max_suspect_share": round(max_suspect, 4),
            "false_dead": false_dead,
            "simulated_s": round(self.clock.t, 1),
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def older_protocols_bytes(sim: Sim, protocol: ProtocolConfig) -> tuple[int, int]:
    """Bytes per peer per second of the two earlier protocols on this converged table:
    fanout exchanges per interval, each sending the whole table (first) or a digest of
    every entry (second) once each way."""
    m = sim.peers[0].membership
    per_s = 2 * protocol.gossip_fanout / protocol.heartbeat_interval_s
    table = len(msgpack.packb({"peers": m.table()}, use_bin_type=True))
    digest = len(msgpack.packb({"digest": m.digest()}, use_bin_type=True))
    return round(per_s * table), round(per_s * digest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--warmup-s", type=float, default=6.0)
    parser.add_argument("--max-wait-s", type=float, default=40.0)
    parser.add_argument("--min-after-s", type=float, default=2.0, help="run on this long")
    parser.add_argument(
        "--round-s", type=float, default=60.0, help="each peer's round time (0: never moves)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/sim_membership.json")
    args = parser.parse_args()
    protocol = ProtocolConfig()
    rows = []
    for n in args.peers:
        begin = time.perf_counter()
        sim = Sim(n, protocol, args)
        whole, digests = older_protocols_bytes(sim, protocol)
        row = {
            "peers": n,
            **sim.run(),
            "whole_table_bytes_per_peer_s": whole,
            "digest_bytes_per_peer_s": digests,
        }
        row["wall_s"] = round(time.perf_counter() - begin, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    settings = {
        "heartbeat_interval_s": protocol.heartbeat_interval_s,
        "gossip_fanout": protocol.gossip_fanout,
        "suspect_after_s": protocol.suspect_after_s,
        "dead_after_s": protocol.dead_after_s,
        "round_s": args.round_s,
        "seed": args.seed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    print()
    print(
        "| peers | join known by all (s) | death known by all (s) | gossip B/peer/s "
        "| digests B/peer/s (before) | whole tables B/peer/s (first) "
        "| max suspect share | false dead |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['peers']} | {r['join_known_s']} | {r['death_known_s']} | "
            f"{r['bytes_per_peer_s']:,} | {r['digest_bytes_per_peer_s']:,} | "
            f"{r['whole_table_bytes_per_peer_s']:,} | "
            f"{r['max_suspect_share']} | {r['false_dead']} |"
        )


if __name__ == "__main__":
    main()
