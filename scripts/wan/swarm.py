"""Run a shoal swarm across emulated slow links: one peer process per network namespace
(`scripts/wan/netns.py`), each link shaped to the given rate; root needed.

    sudo python scripts/wan/swarm.py --peers 4 --rate 10mbit --rounds 6 --out /tmp/wan \\
        -- --model small --outer diloco --codec int8

Flags after `--` go to every `shoal peer`. Peer i listens on 10.77.0.<i+1>:7000 in its own
namespace (with `--rate loopback`: on 127.0.0.1 port 0, its URL read from the `serving`
line it prints); the others bootstrap from peer 0 once it serves. `--nat 2 3` puts those
peers behind NAT (`netns.py`): they listen on 10.78.<i>.2:7000, which no one outside can
reach, so the dial-back at join fails and they run in client mode, through relays. Each
writes its report (round log, traffic, inner-step time) to OUT/peer-<i>.json; peer logs go
to OUT/peer-<i>.log. The namespaces are torn down when the swarm ends, fails, times out or is
interrupted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import Wan  # noqa: E402

from shoal.peer.demo import STARTUP_TIMEOUT_S, serving_url  # noqa: E402

PORT = 7000


def run_swarm(
    peers: int,
    rates: Sequence[str] | None,
    rounds: int,
    out: Path,
    flags: Sequence[str],
    timeout_s: float = 1800.0,
    prefix: str = "shoal",
    peer_flags: Sequence[Sequence[str]] | None = None,
    nat: Sequence[int] = (),
) -> list[dict]:
    """Start the swarm, wait for every peer to finish its rounds, return their reports.
    `rates` None: no namespaces, every peer on 127.0.0.1 (unshaped loopback, no root).
    `peer_flags[i]`, when given, go to peer i only (after `flags`); `nat`: the peers
    behind NAT (namespaces only)."""
    out.mkdir(parents=True, exist_ok=True)
    extra = [list(f) for f in peer_flags] if peer_flags is not None else [[] for _ in range(peers)]
    if len(extra) != peers:
        raise ValueError(f"peer_flags has {len(extra)} entries for {peers} peers")
    if rates is None:  # port 0: no port is picked and then bound by another (a race)
        if nat:
            raise ValueError("--nat needs namespaces (a --rate other than loopback)")
        return _launch(
            rounds, out, flags, extra, timeout_s, ["127.0.0.1:0"] * peers, lambda i, argv: argv
        )
    with Wan(peers, rates, prefix, nat) as wan:
        return _launch(
            rounds,
            out,
            flags,
            extra,
            timeout_s,
            [f"{wan.listen_address(i)}:{PORT}" for i in range(peers)],
            wan.exec_args,
        )


def _launch(
    rounds: int,
    out: Path,
    flags: Sequence[str],
    extra: list[list[str]],
    timeout_s: float,
    listen: list[str],
    wrap: Callable[[int, list[str]], list[str]],
) -> list[dict]:
    procs: list[subprocess.Popen] = []
    peers = len(extra)
    first_url = ""
    try:
        for i in range(peers):
            cmd = [
                sys.executable,
                "-m",
                "shoal.peer.cli",
                "peer",
                "--listen",
                listen[i],
                "--peer-id",
                f"peer-{i}",
                "--rounds",
                str(rounds),
                "--min-peers",
                str(peers),
                "--report",
                str(out / f"peer-{i}.json"),
                *flags,
                *extra[i],
            ]
            if i:
                cmd += ["--bootstrap", first_url]
            with open(out / f"peer-{i}.log", "w") as log:
                procs.append(subprocess.Popen(wrap(i, cmd), stdout=log, stderr=subprocess.STDOUT))
            if i == 0:  # the others bootstrap from the URL it prints once it serves
                first_url = serving_url(out / "peer-0.log", procs[0], STARTUP_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        while any(
            proc.poll() is None for proc in procs
        ):  # a peer that fails ends the run at once, not at the deadline
            for i, proc in enumerate(procs):
                if proc.poll():
                    raise RuntimeError(
                        f"peer-{i} exited with {proc.returncode}; see {out / f'peer-{i}.log'}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the swarm did not finish within {timeout_s:.0f} s; see {out}")
            time.sleep(0.5)
        for i, proc in enumerate(procs):
            if proc.returncode:
                raise RuntimeError(
                    f"peer-{i} exited with {proc.returncode}; see {out / f'peer-{i}.log'}"
                )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return [json.loads((out / f"peer-{i}.json").read_text()) for i in range(peers)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument(
        "--rate",
        nargs="+",
        default=["10mbit"],
        help="one rate for all peers, or one per peer; 'loopback': no namespaces",
    )
    parser.add_argument(
        "--nat", nargs="+", type=int, default=[], metavar="I", help="peers behind NAT (netns.py)"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="wan-run")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "flags", nargs=argparse.REMAINDER, help="-- then flags for every `shoal peer`"
    )
    args = parser.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    rates = None if args.rate == ["loopback"] else args.rate
    reports = run_swarm(
        args.peers, rates, args.rounds, Path(args.out), flags, args.timeout, nat=args.nat
    )
    for report in reports:
        last = report["rounds"][-1] if report["rounds"] else {}
        print(
            f"{report['peer_id']}: {len(report['rounds'])} rounds, "
            f"eval {last.get('eval_loss', float('nan')):.3f}, "
            f"sent {report['bytes_sent'] / 1e6:.1f} MB, "
            f"longest stall {report['longest_stall_s']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
