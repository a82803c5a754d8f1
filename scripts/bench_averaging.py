r"""One averaging of a pseudo-gradient across N peers on loopback: shoal's exchange (with each
codec) against hivemind's DecentralizedAverager (fp16 and uint8), same tensors, same run.

    python scripts/bench_averaging.py --peers 2 4 8 --sizes 10M 50M \
        --out results/bench_averaging.json

Every peer is its own process, holding a tensor of the given size (peer i: N(0, 1) with
seed i). All peers start together (a barrier) and the wall time runs until the last one
holds its result.
* shoal: real peers (`shoal.peer.node.Peer`, serving HTTP, gossiping) whose outer optimizer
  holds the one tensor; one round of DiLoCo at lr 1 and no momentum (so the result is the
  mean of what was sent): publish → agree → reduce-scatter + all-gather → outer step for
  the dense codecs (`shoal-int8`, `shoal-fp16`: the mean re-quantized with the codec),
  publish → gather → agree → outer step for `shoal-int8-gather`; or SparseLoCo (top-k +
  2-bit, always gathered: a sparse estimate of the mean, by design).
* hivemind: `hivemind.averaging.DecentralizedAverager` on its own DHT, group size N,
  `min_matchmaking_time` --matchmaking s (matchmaking is part of its averaging step).
Bytes: what the loopback interface carried during the step (/proc/net/dev, all peers,
every protocol byte), divided by N; for shoal also its own count of HTTP bodies.
`rel_err`: ‖result − true mean‖ / ‖true mean‖ on peer 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHOAL_METHODS = {  # name -> (outer optimizer, codec, exchange)
    "shoal-fp16": ("diloco", "fp16", "auto"),
    "shoal-int8": ("diloco", "int8", "auto"),  # reduce-scatter + all-gather (peer.reduce)
    "shoal-int8-gather": ("diloco", "int8", "gather"),  # every peer fetches every contribution
    "shoal-topk": ("sparseloco", "topk", "auto"),  # sparse: always the gather
}
HIVEMIND_METHODS = {
    "hivemind-fp16": "Float16Compression",
    "hivemind-uint8": "Uniform8BitQuantization",
}


def peer_tensor(rank: int, size: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(rank))


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])  # transmitted bytes
    raise RuntimeError("no loopback interface in /proc/net/dev")


def shoal_worker(
    rank: int, n: int, size: int, method: str, corpus: str, barrier, addresses, results
) -> None:
    torch.set_num_threads(1)
    from shoal.optim.outer import OuterConfig
    from shoal.optim.registry import build_outer, outer_config
    from shoal.peer.config import PeerConfig, ProtocolConfig, RunConfig
    from shoal.peer.node import Peer
    from shoal.peer.reduce import ShardedMean
    from shoal.peer.rounds import RoundExchange
    from shoal.train import PRESETS

    outer_name, codec, exchange_kind = SHOAL_METHODS[method]
    overrides = {"lr": 1.0, "momentum": 0.0} if outer_name == "diloco" else {}
    outer: OuterConfig = outer_config(outer_name, codec=codec, exchange=exchange_kind, **overrides)

    async def main() -> None:
        from shoal.optim.inner import InnerConfig

        run = RunConfig(
            model_preset="tiny",
            model=PRESETS["tiny"].to_dict(),
            inner=InnerConfig(batch_size=2, seq_len=16),
            outer=outer,
            inner_steps=1,
        )
        protocol = ProtocolConfig(
            min_gather_timeout_s=600.0, agree_timeout_s=600.0, request_timeout_s=600.0
        )
        bootstrap = None if rank == 0 else addresses.get(0)
        while rank and bootstrap is None:
            await asyncio.sleep(0.1)
            bootstrap = addresses.get(0)
        peer = Peer(
            PeerConfig.of(
                run,
                peer_id=f"peer-{rank}",
                bootstrap=bootstrap,
                data_path=corpus,
                eval_batches=1,
                torch_threads=1,
                protocol=protocol,
            )
        )
        await peer.start(train=False)
        addresses[rank] = peer.address
        averaged = build_outer({"w": torch.zeros(size)}, outer)

        async def decode(tensors):
            return await asyncio.to_thread(averaged.decode_contribution, tensors)

        exchange = RoundExchange(peer.client, peer.membership, peer.store, protocol, decode)
        while len(peer.membership.live_others()) < n - 1:
            await asyncio.sleep(0.1)
        local = {"w": -peer_tensor(rank, size)}  # Δ = 0 − local = the peer's tensor
        await asyncio.to_thread(barrier.wait)
        begin = time.perf_counter()
        if averaged.reducible:  # what a peer's RoundEngine does for a dense codec
            codec = averaged.codec
            sharded = ShardedMean(exchange, codec.encode, lambda d, c: codec.decode(d, (c,)))
            sharded.publish(0, await asyncio.to_thread(averaged.flat_delta, local))
            view = [p.peer_id for p in peer.membership.live_others()]
            final = await exchange.agree(0, 600.0, view)
            mean, final = await sharded.mean(0, final, 600.0, outer.shard_elements)
            await asyncio.to_thread(averaged.apply_mean, mean)
        else:
            payload = await asyncio.to_thread(averaged.contribution, local)
            own = await asyncio.to_thread(averaged.decode_contribution, payload)
            answer = {"round": 0, "peer": peer.peer_id, "tensors": payload}
            await exchange.publish(0, await asyncio.to_thread(peer.wire.prepare, answer), own)
            await exchange.gather(0, 600.0)
            final = await exchange.agree(0, 600.0)
            await asyncio.to_thread(averaged.apply, exchange.contributions(0, final))
        seconds = time.perf_counter() - begin
        result = -averaged.params["w"]  # θ = 0 − lr·mean(Δ)
        await asyncio.to_thread(barrier.wait)  # everyone done before anyone stops serving
        results.put(
            {
                "rank": rank,
                "seconds": seconds,
                "peers": len(final),
                "own_bytes_sent": peer.traffic.bytes_sent,
                "result": result.numpy().tobytes() if rank == 0 else None,
            }
        )
        await peer.stop()

    asyncio.run(main())


def hivemind_worker(
    rank: int, n: int, size: int, method: str, matchmaking: float, barrier, addresses, results
) -> None:
    torch.set_num_threads(1)
    mp.set_start_method(
        "fork", force=True
    )  # hivemind's DHT and averager are fork-started processes
    import hivemind
    from hivemind import compression as hm_compression

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_codecs import patch_hivemind_extract

    patch_hivemind_extract()

    initial = [] if rank == 0 else None
    while initial is None:
        initial = addresses.get(0)
        time.sleep(0.1)
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial)
    if rank == 0:
        addresses[0] = [str(a) for a in dht.get_visible_maddrs()]
    tensor = peer_tensor(rank, size)
    averager = hivemind.averaging.DecentralizedAverager(
        [tensor],
        dht,
        start=True,
        prefix=f"bench{n}x{size}",
        target_group_size=n,
        min_group_size=n,
        min_matchmaking_time=matchmaking,
        request_timeout=10.0,
        compression=getattr(hm_compression, HIVEMIND_METHODS[method])(),
    )
    barrier.wait()
    begin = time.perf_counter()
    group = averager.step(wait=True, timeout=600)
    seconds = time.perf_counter() - begin
    with averager.get_tensors() as (averaged,):
        result = averaged.clone()
    barrier.wait()
    results.put(
        {
            "rank": rank,
            "seconds": seconds,
            "peers": len(group) if group else 0,
            "own_bytes_sent": None,
            "result": result.numpy().tobytes() if rank == 0 else None,
        }
    )
    averager.shutdown()
    dht.shutdown()


def run_one(method: str, n: int, size: int, args: argparse.Namespace, corpus: str) -> dict:
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    barrier, addresses, results = ctx.Barrier(n + 1), manager.dict(), ctx.Queue()
    if method in SHOAL_METHODS:
        target, extra = shoal_worker, (corpus,)
    else:
        target, extra = hivemind_worker, (args.matchmaking,)
    procs = [
        ctx.Process(
            target=target, args=(rank, n, size, method, *extra, barrier, addresses, results)
        )
        for rank in range(n)
    ]
    for proc in procs:
        proc.start()
    try:
        barrier.wait(timeout=args.timeout)  # everyone ready
        before = loopback_bytes()
        begin = time.perf_counter()
        barrier.wait(timeout=args.timeout)  # everyone done
        wall = time.perf_counter() - begin
        wire = loopback_bytes() - before
        rows = [results.get(timeout=args.timeout) for _ in range(n)]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
        manager.shutdown()
    mean = sum(peer_tensor(rank, size) for rank in range(n)) / n
    result = torch.frombuffer(
        bytearray(next(r["result"] for r in rows if r["rank"] == 0)), dtype=torch.float32
    )
    own = [r["own_bytes_sent"] for r in rows if r["own_bytes_sent"] is not None]
    return {
        "method": method,
        "peers": n,
        "size": size,
        "seconds": max(r["seconds"] for r in rows),
        "seconds_barrier_to_barrier": wall,
        "group": min(r["peers"] for r in rows),
        "wire_bytes_per_peer": wire / n,
        "own_bytes_sent_per_peer": statistics.fmean(own) if own else None,
        "rel_err": float(torch.linalg.norm(result - mean) / torch.linalg.norm(mean)),
    }


def median_row(runs: list[dict]) -> dict:
    """One row for repeated runs of a method: medians of the times and bytes, every run's
    seconds kept."""
    row = dict(runs[0])
    for key in ("seconds", "seconds_barrier_to_barrier", "wire_bytes_per_peer", "rel_err"):
        row[key] = statistics.median(r[key] for r in runs)
    row["seconds_runs"] = [r["seconds"] for r in runs]
    return row


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 10**6}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--sizes", nargs="+", default=["10M", "50M"], help="elements (M = 10^6)")
    parser.add_argument("--methods", nargs="+", default=[*SHOAL_METHODS, *HIVEMIND_METHODS])
    parser.add_argument(
        "--matchmaking", type=float, default=1.0, help="hivemind's min_matchmaking_time"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every method, interleaved (A B C A B C ...); rows report the medians, "
        "so load that comes and goes on a shared machine hits every method alike",
    )
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default="results/bench_averaging.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        Path(corpus).write_text(
            Path(json.__file__).read_text() * 4
        )  # peers need some text to build
        rows = []
        for size in map(parse_size, args.sizes):
            for n in args.peers:
                runs: dict[str, list[dict]] = {m: [] for m in args.methods}
                for repeat in range(args.repeats):
                    for method in args.methods:
                        print(f"== {method}: {n} peers, {size:,} elements ({repeat + 1})")
                        row = run_one(method, n, size, args, corpus)
                        runs[method].append(row)
                        print(
                            f"   {row['seconds']:.2f} s, {row['wire_bytes_per_peer'] / 1e6:.1f} "
                            "MB/peer on the wire, "
                            f"rel_err {row['rel_err']:.4f}",
                            flush=True,
                        )
                by_method = {m: median_row(r) for m, r in runs.items()}
                rows.extend(by_method.values())
                base = by_method.get("hivemind-fp16")
                for row in by_method.values():
                    row["time_vs_hivemind_fp16"] = (
                        row["seconds"] / base["seconds"] if base else None
                    )
                    row["bytes_vs_hivemind_fp16"] = (
                        row["wire_bytes_per_peer"] / base["wire_bytes_per_peer"] if base else None
                    )
    print(
        f"{'size':>6} {'N':>2} {'method':<15} {'seconds':>8} {'MB/peer':>9} {'rel_err':>8} "
        f"{'time/hm16':>9} {'bytes/hm16':>10}"
    )

    def ratio(value: float | None) -> str:
        return f"{value:9.3f}" if value is not None else f"{'-':>9}"

    for r in rows:
        print(
            f"{r['size'] / 1e6:5.0f}M {r['peers']:2d} {r['method']:<15} {r['seconds']:8.2f} "
            f"{r['wire_bytes_per_peer'] / 1e6:9.2f} "
            f"{r['rel_err']:8.4f} {ratio(r['time_vs_hivemind_fp16'])} "
            f"{ratio(r['bytes_vs_hivemind_fp16'])}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python scripts/bench_averaging.py " + " ".join(sys.argv[1:]),
                "torch_threads": 1,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
