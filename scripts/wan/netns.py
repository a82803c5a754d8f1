"""Emulated slow links on one machine: one network namespace per peer, joined by veth pairs
to a bridge in its own namespace, each peer's link shaped with `tc` (root needed).

    sudo python scripts/wan/netns.py up --peers 4 --rate 10mbit      # build
    sudo python scripts/wan/netns.py exec 2 -- python -m shoal.peer.cli peer ...
    sudo python scripts/wan/netns.py down                            # tear down

Layout (prefix `shoal` by default):

    namespace shoal-br:  bridge br0, and one end `b<i>` of each peer's veth pair
    namespace shoal-p<i>: the other end, renamed eth0, address 10.77.0.<i+1>/24, plus lo

Each peer's link is shaped in both directions with a token bucket (`tbf`): its upload on
eth0 inside the peer's namespace, its download on `b<i>` in the bridge namespace (what
the bridge sends towards the peer). So `--rate 10mbit` is a 10 Mbit/s up, 10 Mbit/s down
home link, and peers talking to each other share nothing but their own two buckets. The
kernel here has no `netem`, so there is no added latency: a link's delay is its
serialization time at the given rate plus the bucket's queue.

Peers behind NAT (`--nat 2 3`): peer i sits behind a router namespace of its own, as a
volunteer at home does. The router takes the peer's place on the bridge (10.77.0.<i+1>,
its "wan0"), the peer is 10.78.<i>.2/24 behind it ("lan0", 10.78.<i>.1, the peer's default
route), and nftables on the router masquerades what leaves through wan0 and forwards into
lan0 only the answers of connections the peer opened: nothing from outside can connect to
the peer (no route to 10.78.<i>.0/24 outside, and no forwarding of new connections even
with one), and the router itself drops new connections on wan0. The peer listens on
10.78.<i>.2 (`listen_address`) and connects out as 10.77.0.<i+1>. The links are shaped as
for the others (the peer's upload on its eth0, its download on the bridge's port).

    sudo python scripts/wan/netns.py up --peers 3 --nat 2    # peer 2 behind NAT
    sudo python scripts/wan/netns.py check-nat 2             # inbound refused, outbound works

`Wan` is also a context manager for scripts (`scripts/wan/swarm.py`); it tears down on exit,
on Ctrl-C and on SIGTERM. Only namespaces carrying the prefix are ever touched.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

SUBNET = "10.77.0"
NAT_SUBNET = "10.78"  # 10.78.<i>.0/24 behind peer i's router
# Peer i's router: masquerade outgoing, forward in only the answers, no new inbound at all.
NAT_RULES = """
table ip shoal_nat {
  chain forward {
    type filter hook forward priority 0; policy drop;
    iifname "lan0" oifname "wan0" accept
    iifname "wan0" oifname "lan0" ct state established,related accept
  }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "wan0" ct state new drop
  }
  chain postrouting {
    type nat hook postrouting priority 100;
    oifname "wan0" masquerade
  }
}
"""


def sh(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, input=stdin)


def parse_rate(text: str) -> str:
    """`10mbit`, `100Mbit`, `512kbit`, or a bare number of Mbit/s, as tc's syntax."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return f"{text}mbit"
    if not re.fullmatch(r"\d+(\.\d+)?(kbit|mbit|gbit)", text):
        raise ValueError(f"rate {text!r}: want e.g. 10mbit, 512kbit or a number of Mbit/s")
    return text


def rate_bits(rate: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(kbit|mbit|gbit)", parse_rate(rate)).groups()
    return float(number) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[unit]


def tbf(rate: str) -> list[str]:
    """tc arguments for a token bucket at `rate`: a burst of ~10 ms of traffic (at least
    two full frames) and a queue of ~100 ms, so a saturated link queues, not drops."""
    bits = rate_bits(rate)
    burst = max(3200, int(bits / 8 * 0.01))
    limit = max(2 * burst, int(bits / 8 * 0.1))
    return ["tbf", "rate", parse_rate(rate), "burst", str(burst), "limit", str(limit)]


@dataclass
class Wan:
    peers: int
    rates: Sequence[str]  # one per peer (a single value is repeated)
    prefix: str = "shoal"
    nat: Sequence[int] = ()  # peers behind NAT (module doc)

    def __post_init__(self) -> None:
        if not 1 <= self.peers <= 200:
            raise ValueError("--peers must be in 1..200")
        self.nat = sorted(set(self.nat))
        if not all(0 <= i < self.peers for i in self.nat):
            raise ValueError(f"--nat wants peer indices in 0..{self.peers - 1}, got {self.nat}")
        rates = list(self.rates) or ["10mbit"]
        if len(rates) == 1:
            rates *= self.peers
        if len(rates) != self.peers:
            raise ValueError(f"give one rate or one per peer ({self.peers}), got {len(rates)}")
        self.rates = [parse_rate(r) for r in rates]
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", self.prefix):
            raise ValueError(
                "--prefix must be 1-8 lowercase letters/digits, starting with a letter"
            )

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    def namespace(self, i: int) -> str:
        return f"{self.prefix}-p{i}"

    def router(self, i: int) -> str:
        return f"{self.prefix}-r{i}"

    @staticmethod
    def address(i: int) -> str:
        """Peer i's address on the bridge (for a peer behind NAT, its router's)."""
        return f"{SUBNET}.{i + 1}"

    def listen_address(self, i: int) -> str:
        """Where peer i listens: its address on the bridge, or behind its router."""
        return f"{NAT_SUBNET}.{i}.2" if i in self.nat else self.address(i)

    def up(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root")
        if self.nat and shutil.which("nft") is None:
            raise FileNotFoundError("--nat needs nftables' nft (apt-get install nftables)")
        self.down()  # leftovers of an interrupted run
        br = self.bridge
        sh("ip", "netns", "add", br)
        self._in(br, "ip", "link", "add", "br0", "type", "bridge")
        self._in(br, "ip", "link", "set", "br0", "up")
        self._in(br, "ip", "link", "set", "lo", "up")
        for i, rate in enumerate(self.rates):
            ns, outer = self.namespace(i), f"b{i}"
            sh("ip", "netns", "add", ns)
            self._in(ns, "ip", "link", "set", "lo", "up")
            # on the bridge: the peer itself, or its router (then the peer behind the router)
            on_bridge = self.router(i) if i in self.nat else ns
            if i in self.nat:
                sh("ip", "netns", "add", on_bridge)
                self._in(on_bridge, "ip", "link", "set", "lo", "up")
            inner = "wan0" if i in self.nat else "eth0"
            # create the pair inside the bridge namespace, then move one end to the peer's
            self._in(br, "ip", "link", "add", outer, "type", "veth", "peer", "name", f"p{i}")
            self._in(br, "ip", "link", "set", f"p{i}", "netns", on_bridge)
            self._in(on_bridge, "ip", "link", "set", f"p{i}", "name", inner)
            self._in(on_bridge, "ip", "addr", "add", f"{self.address(i)}/24", "dev", inner)
            self._in(on_bridge, "ip", "link", "set", inner, "up")
            self._in(br, "ip", "link", "set", outer, "master", "br0")
            self._in(br, "ip", "link", "set", outer, "up")
            if i in self.nat:
                self._behind_router(i)
            self._in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf(rate))  # upload
            self._in(br, "tc", "qdisc", "add", "dev", outer, "root", *tbf(rate))  # download

    def _behind_router(self, i: int) -> None:
        """Peer i's namespace behind its router: a veth pair lan0 ↔ eth0, the default
        route through the router, forwarding and the NAT rules on the router."""
        ns, router, lan = self.namespace(i), self.router(i), f"{NAT_SUBNET}.{i}"
        self._in(router, "ip", "link", "add", "lan0", "type", "veth", "peer", "name", f"n{i}")
        self._in(router, "ip", "link", "set", f"n{i}", "netns", ns)
        self._in(ns, "ip", "link", "set", f"n{i}", "name", "eth0")
        self._in(router, "ip", "addr", "add", f"{lan}.1/24", "dev", "lan0")
        self._in(ns, "ip", "addr", "add", f"{lan}.2/24", "dev", "eth0")
        self._in(router, "ip", "link", "set", "lan0", "up")
        self._in(ns, "ip", "link", "set", "eth0", "up")
        self._in(ns, "ip", "route", "add", "default", "via", f"{lan}.1")
        self._in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        result = sh("ip", "netns", "exec", router, "nft", "-f", "-", check=False, stdin=NAT_RULES)
        if result.returncode:
            raise RuntimeError(f"in {router}: nft failed: {result.stderr.strip()}")

    def down(self) -> None:
        """Delete every namespace with our prefix (their veth ends go with them)."""
        listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
        for line in listed:
            name = line.split(" ")[0]
            if name == self.bridge or re.fullmatch(rf"{self.prefix}-[pr]\d+", name):
                sh("ip", "netns", "delete", name, check=False)

    def exec_args(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def check_nat(self, i: int, port: int = 7999, timeout_s: float = 1.0) -> dict[str, object]:
        """Connect to peer i (behind NAT) from outside and out of it, with TCP sockets:
        {"inbound_direct", "inbound_router": whether a connection from peer j (outside) to
        the peer's own or its router's address was accepted (both must be False),
        "outbound": whether the peer's connection to peer j was, "seen_as": the source
        address peer j saw (the router's: masqueraded)}."""
        outside = next((j for j in range(self.peers) if j not in self.nat), None)
        if i not in self.nat or outside is None:
            raise ValueError("check-nat wants a peer behind NAT and one peer outside")
        def listener(j: int, host: str, wait_s: float) -> subprocess.Popen:
            argv = [sys.executable, "-c", _LISTEN, host, str(port), str(wait_s)]
            return subprocess.Popen(self.exec_args(j, argv), stdout=subprocess.PIPE, text=True)

        report: dict[str, object] = {}
        for name, target in (
            ("inbound_direct", self.listen_address(i)),
            ("inbound_router", self.address(i)),
        ):
            server = listener(i, "0.0.0.0", timeout_s + 2)
            report[name] = self._connects(outside, target, port, timeout_s)
            server.kill()
            server.wait()
        server = listener(outside, self.address(outside), 5.0)
        report["outbound"] = self._connects(i, self.address(outside), port, 5.0)
        seen, _ = server.communicate(timeout=10)
        report["seen_as"] = seen.strip() or None
        return report

    def _connects(self, j: int, host: str, port: int, timeout_s: float) -> bool:
        """Whether peer j's namespace can open a TCP connection to host:port."""
        code = (
            "import socket,sys,time\n"
            "deadline=time.monotonic()+float(sys.argv[3])\n"
            "while True:\n"
            "  try: socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=0.5); break\n"
            "  except OSError:\n"
            "    if time.monotonic()>deadline: sys.exit(1)\n"
            "    time.sleep(0.1)\n"
        )
        argv = [sys.executable, "-c", code, host, str(port), str(timeout_s)]
        return subprocess.run(self.exec_args(j, argv), capture_output=True).returncode == 0

    @staticmethod
    def _in(ns: str, *argv: str) -> None:
        result = sh("ip", "netns", "exec", ns, *argv, check=False)
        if result.returncode:
            raise RuntimeError(f"in {ns}: {' '.join(argv)} failed: {result.stderr.strip()}")

    def __enter__(self) -> Wan:
        self._previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
        for s in self._previous:
            signal.signal(s, _raise_interrupt)
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# a TCP listener for check_nat: accepts one connection and prints the peer's address
_LISTEN = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind((sys.argv[1],int(sys.argv[2]))); s.listen(); s.settimeout(float(sys.argv[3]))\n"
    "try: c,a=s.accept(); print(a[0])\n"
    "except OSError: pass\n"
)


def existing_nat(prefix: str) -> list[int]:
    """The peers behind NAT of namespaces built earlier (their routers' namespaces)."""
    listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
    names = [line.split(" ")[0] for line in listed]
    return [int(m.group(1)) for n in names if (m := re.fullmatch(rf"{prefix}-r(\d+)", n))]


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", default="shoal")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the namespaces and shape the links")
    up.add_argument("--peers", type=int, default=4)
    up.add_argument(
        "--rate", nargs="+", default=["10mbit"], help="one rate for all, or one per peer"
    )
    up.add_argument("--nat", nargs="+", type=int, default=[], help="peers behind NAT", metavar="I")
    sub.add_parser("down", help="delete the namespaces")
    check = sub.add_parser("check-nat", help="show that peer I behind NAT takes no inbound")
    check.add_argument("index", type=int)
    run = sub.add_parser("exec", help="run a command in peer I's namespace")
    run.add_argument("index", type=int)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "up":
        wan = Wan(args.peers, args.rate, args.prefix, args.nat)
        wan.up()
        for i, rate in enumerate(wan.rates):
            behind = f" behind NAT ({wan.router(i)} is {wan.address(i)})" if i in wan.nat else ""
            print(f"{wan.namespace(i)}  {wan.listen_address(i)}  {rate} up/down{behind}")
    elif args.command == "check-nat":
        nat = existing_nat(args.prefix)
        wan = Wan(max([args.index, *nat]) + 1, ["1mbit"], args.prefix, nat)
        report = wan.check_nat(args.index)
        print(report)
        closed = not report["inbound_direct"] and not report["inbound_router"]
        return 0 if closed and report["outbound"] else 1
    elif args.command == "down":
        Wan(1, ["1mbit"], args.prefix).down()
    else:
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return subprocess.call(
            Wan(args.index + 1, ["1mbit"], args.prefix).exec_args(args.index, argv)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
