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

`Wan` is also a context manager for scripts (`scripts/wan/swarm.py`); it tears down on exit,
on Ctrl-C and on SIGTERM. Only namespaces carrying the prefix are ever touched.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

SUBNET = "10.77.0"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


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

    def __post_init__(self) -> None:
        if not 1 <= self.peers <= 200:
            raise ValueError("--peers must be in 1..200")
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

    @staticmethod
    def address(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def up(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root")
        self.down()  # leftovers of an interrupted run
        br = self.bridge
        sh("ip", "netns", "add", br)
        self._in(br, "ip", "link", "add", "br0", "type", "bridge")
        self._in(br, "ip", "link", "set", "br0", "up")
        self._in(br, "ip", "link", "set", "lo", "up")
        for i, rate in enumerate(self.rates):
            ns, outer = self.namespace(i), f"b{i}"
            sh("ip", "netns", "add", ns)
            # create the pair inside the bridge namespace, then move one end to the peer's
            self._in(br, "ip", "link", "add", outer, "type", "veth", "peer", "name", f"p{i}")
            self._in(br, "ip", "link", "set", f"p{i}", "netns", ns)
            self._in(ns, "ip", "link", "set", f"p{i}", "name", "eth0")
            self._in(ns, "ip", "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            self._in(ns, "ip", "link", "set", "eth0", "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            self._in(br, "ip", "link", "set", outer, "master", "br0")
            self._in(br, "ip", "link", "set", outer, "up")
            self._in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf(rate))  # upload
            self._in(br, "tc", "qdisc", "add", "dev", outer, "root", *tbf(rate))  # download

    def down(self) -> None:
        """Delete every namespace with our prefix (their veth ends go with them)."""
        listed = sh("ip", "netns", "list", check=False).stdout.split("\n")
        for line in listed:
            name = line.split(" ")[0]
            if name == self.bridge or re.fullmatch(rf"{self.prefix}-p\d+", name):
                sh("ip", "netns", "delete", name, check=False)

    def exec_args(self, i: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(i), *argv]

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
    sub.add_parser("down", help="delete the namespaces")
    run = sub.add_parser("exec", help="run a command in peer I's namespace")
    run.add_argument("index", type=int)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "up":
        wan = Wan(args.peers, args.rate, args.prefix)
        wan.up()
        for i, rate in enumerate(wan.rates):
            print(f"{wan.namespace(i)}  {wan.address(i)}  {rate} up/down")
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
