"""The `shoal` command: `shoal peer` runs one peer, `shoal demo` a local swarm."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from shoal.optim.inner import InnerConfig
from shoal.peer.config import PeerConfig, ProtocolConfig, RunConfig
from shoal.peer.errors import ShoalError
from shoal.pipeline.worker import RESCALE_MODES

log = logging.getLogger("shoal")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def _stage_list(flag: str, none_ok: bool = False):
    """argparse type for FLAG's comma-separated stage numbers (with `none_ok`, "none": no stage)."""

    def parse(value: str) -> tuple[int, ...]:
        if none_ok and value == "none":
            return ()
        try:
            return tuple(int(part) for part in value.split(","))
        except ValueError:
            example = "1,3,5 or none" if none_ok else "1,3,5"
            raise argparse.ArgumentTypeError(f"{flag} wants stage numbers separated by commas, e.g. {example}; got {value!r}") from None

    return parse


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that define the run (every peer of a run must pass the same values)."""
    from shoal.compression import CODECS
    from shoal.optim.registry import OUTER_OPTIMIZERS
    from shoal.train import PRESETS

    run = parser.add_argument_group("run (must match across the swarm)")
    run.add_argument("--model", default="small", choices=sorted(PRESETS), help="model size preset (default: small)")
    run.add_argument("--inner-steps", type=int, help="H, inner steps per outer round (default: the preset's recipe)")
    run.add_argument("--outer", default="diloco", choices=sorted(OUTER_OPTIMIZERS), help="outer optimizer")
    run.add_argument("--codec", choices=sorted(CODECS), help="pseudo-gradient codec (default: int8 for diloco and noloco, topk for sparseloco, q4 for streaming)")
    run.add_argument("--outer-lr", type=float, help="outer learning rate (default: 0.7 for diloco and noloco's η, 1.0 for sparseloco)")
    run.add_argument("--outer-momentum", type=float, help="outer momentum (default: 0.9 Nesterov for diloco, 0.5 for noloco, 0 for sparseloco)")
    run.add_argument("--error-decay", type=float, help="sparseloco's error-feedback decay (default 0.95)")
    run.add_argument("--topk", type=int, help="sparseloco's values kept per 4096-element chunk (default 64)")
    run.add_argument("--fragments", type=int, help="streaming: P, parameter fragments synced in turn (default 4)")
    run.add_argument("--overlap", type=int, help="streaming: τ, inner steps each exchange overlaps (default 5)")
    run.add_argument("--mix", type=float, help="streaming: α in θ_local ← α·θ_local + (1−α)·θ_outer (default 0.5)")
    run.add_argument("--inner-lr", type=float, help="AdamW learning rate (default: the preset's recipe)")
    run.add_argument("--batch-size", type=int, help="sequences per inner step (default: the preset's recipe)")
    run.add_argument("--seq-len", type=int, help="bytes per sequence (default: the preset's recipe)")
    run.add_argument("--seed", type=int, default=0, help="initial-weights seed of the run")
    run.add_argument("--stages", type=int, default=0, help="pipeline stages S of the run's pipeline replicas (default 0: full replicas only)")


def run_config_from(args: argparse.Namespace) -> RunConfig:
    from shoal.optim.registry import outer_config
    from shoal.train import PRESETS, RECIPES

    recipe = RECIPES[args.model]
    inner = InnerConfig(
        lr=args.inner_lr or recipe.inner_lr,
        warmup_steps=recipe.warmup_steps,
        batch_size=args.batch_size or recipe.batch_size,
        seq_len=args.seq_len or recipe.seq_len,
    )
    outer = outer_config(args.outer, codec=args.codec, lr=args.outer_lr, momentum=args.outer_momentum,
                         error_decay=args.error_decay, topk=args.topk, fragments=args.fragments, overlap=args.overlap,
                         mix=args.mix)
    return RunConfig(model_preset=args.model, model=PRESETS[args.model].to_dict(), inner=inner, outer=outer,
                     inner_steps=args.inner_steps or recipe.inner_steps, seed=args.seed, stages=args.stages)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Train one model across many machines over slow links.")
    sub = parser.add_subparsers(dest="command", required=True)

    peer = sub.add_parser("peer", help="run one peer (the first peer of a run needs no --bootstrap)")
    peer.add_argument("--listen", type=_host_port, default=("127.0.0.1", 7000), metavar="HOST:PORT", help="default 127.0.0.1:7000; port 0 picks a free one")
    peer.add_argument("--advertise", help="URL other peers reach this one at (default: http://HOST:PORT of --listen)")
    peer.add_argument("--bootstrap", metavar="URL", help="any peer of the run, e.g. http://10.0.0.5:7000")
    peer.add_argument("--swarm-key", default=os.environ.get("SHOAL_SWARM_KEY"), help="shared secret; every message is HMAC-signed with it (env SHOAL_SWARM_KEY)")
    peer.add_argument("--peer-id", help="this peer's id (default: random); also picks its data shard")
    peer.add_argument("--role", default="replica", choices=["replica", "stage"], help="replica: a full model replica; stage: one stage of a pipeline replica (needs --stages)")
    peer.add_argument("--stage", type=int, help="--role stage: the stage to serve (default: the least served one in the swarm); stage 0 holds the data and drives the pipeline")
    peer.add_argument("--standby", action="store_true", help="--role stage: join and wait, serving nothing, until some stage loses every peer; then take it over, rebuilt from its neighbours (CheckFree), or for stage 0 copied from stage 1 (CheckFree+)")
    peer.add_argument("--activation", default="none", help="activation codec of this pipeline replica: none, int8, subspace:RATIO, subspace-int8:RATIO or subspace-int4:RATIO (e.g. subspace-int4:32; int8 and 4-bit coordinates give about twice and four times the subspace at the same bytes); on a full replica, a subspace setting trains it confined as such a replica would be (for comparisons)")
    peer.add_argument("--microbatch-size", type=int, default=4, help="stage 0: sequences per microbatch (default 4)")
    peer.add_argument("--in-flight", type=int, default=4, help="stage 0: microbatches in the pipeline at once (default 4)")
    peer.add_argument("--router", default="swarm", choices=["random", "swarm"], help="stage 0: per-hop choice among a stage's peers (default swarm: least projected busy time)")
    peer.add_argument("--skip-ratio", type=float, default=0.0, help="stage 0: SkipPipe: each microbatch skips this share of the stages on paths planned around slow peers (e.g. 0.33; default 0: every stage)")
    peer.add_argument("--skip-swaps", type=int, default=0, help="stage 0: SkipPipe: most pairs of adjacent stages a path may run swapped (default 0: in order, which cost less loss at the same iteration time in scripts/bench_skippipe.py; the paper allows 2)")
    peer.add_argument("--skip-keep", type=_stage_list("--skip-keep", none_ok=True), default=(1,), help="stage 0: SkipPipe: block stages every path visits, e.g. 1 or 1,5 (default 1: the first block stage, as SkipPipe's stage 0 holds the first layers; none: any stage may be skipped)")
    peer.add_argument("--skip-rescale", default="sqrt", choices=RESCALE_MODES, help="stage 0: SkipPipe: in training forwards a stage on a share p of the paths scales its residual update by p^-1/2 (sqrt, the default) or 1/p (inverse), so later stages train on a residual stream closer to the full model's; none: unscaled")
    peer.add_argument("--out-of-order", type=float, default=0.0, help="stage 0: CheckFree+: this share of microbatches runs the first and last two block stages swapped, so a lost edge stage can be copied from its neighbour (e.g. 0.5)")
    peer.add_argument("--eval-stages", type=_stage_list("--eval-stages"), help="stage 0: also evaluate through only these block stages, e.g. 1,3,5 (inference on part of the model)")
    peer.add_argument("--emulate-forward-ms", type=float, default=0.0, help="benchmarks: emulate a slower device: each training forward of this stage takes at least this many ms, each backward twice that")
    peer.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default auto: cuda when present)")
    peer.add_argument("--data", help="text file, folder or glob of .txt/.jsonl (default: this Python's standard library sources)")
    peer.add_argument("--checkpoint-dir", help="write outer state here after every round")
    peer.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir")
    peer.add_argument("--rounds", type=int, help="stop after this many outer rounds (default: train until stopped)")
    peer.add_argument("--min-peers", type=int, default=1, help="wait until this many peers (this one included) are alive before training")
    peer.add_argument("--threads", type=int, help="torch CPU threads")
    peer.add_argument("--gather-timeout", type=float, help="seconds to wait for others' contributions (default: as long as our inner phase took, at least 10)")
    peer.add_argument("--partner-timeout", type=float, default=10.0, help="noloco: seconds to wait for the step's partner before stepping alone (default 10)")
    peer.add_argument("--eval-every", type=int, default=1, help="evaluate on the held-out split after every N-th round and the last (default 1)")
    peer.add_argument("--report", help="write this peer's round log and traffic as JSON here on exit")
    peer.add_argument("--log-level", default="INFO")
    add_run_arguments(peer)

    demo = sub.add_parser("demo", help="a local swarm of peer processes on 127.0.0.1 with a dashboard")
    demo.add_argument("--peers", type=int, default=3)
    demo.add_argument("--rounds", type=int, default=6)
    demo.add_argument("--summary", help="write the run's summary as JSON here")
    demo.add_argument("--data", help="as for `shoal peer`")
    demo.add_argument("--port", type=int, default=0, help="first peer's port (default: a free one)")
    demo.add_argument("--swarm-key", default=os.environ.get("SHOAL_SWARM_KEY"))
    add_run_arguments(demo)
    return parser


def peer_config_from(args: argparse.Namespace) -> PeerConfig:
    protocol = ProtocolConfig(gather_timeout_s=args.gather_timeout, partner_timeout_s=args.partner_timeout)
    extra = {"peer_id": args.peer_id} if args.peer_id else {}
    return PeerConfig(
        run=run_config_from(args), listen_host=args.listen[0], listen_port=args.listen[1], advertise=args.advertise,
        bootstrap=args.bootstrap, swarm_key=args.swarm_key, role=args.role, stage=args.stage, standby=args.standby, activation=args.activation,
        microbatch_size=args.microbatch_size, in_flight=args.in_flight, router=args.router, skip_ratio=args.skip_ratio, skip_swaps=args.skip_swaps, skip_keep=args.skip_keep, skip_rescale=args.skip_rescale,
        out_of_order=args.out_of_order, eval_stages=args.eval_stages, emulate_forward_ms=args.emulate_forward_ms, device=args.device, data_path=args.data,
        checkpoint_dir=args.checkpoint_dir, resume=args.resume, max_rounds=args.rounds, min_peers=args.min_peers, torch_threads=args.threads,
        eval_every=args.eval_every,
        protocol=protocol, **extra,
    )


async def run_peer(config: PeerConfig, report: str | None = None) -> int:
    from shoal.peer.node import Peer

    node = Peer(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
        print(f"shoal peer {node.peer_id} serving {node.address} (dashboard: {node.address}/)", flush=True)
        done = asyncio.create_task(node.run_until_done())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({done, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if done.done():
            done.result()  # re-raise a training failure: the process exits non-zero
        else:
            done.cancel()
    finally:
        try:
            if report:
                write_report(node, report)
        finally:
            await node.stop()
    return 0


def write_report(node, path: str) -> None:
    data = {
        "peer_id": node.peer_id, "address": node.address, "round": node.outer_round,
        "rounds": node.round_log, "initial_eval_loss": node.initial_eval_loss,
        "bytes_sent": node.traffic.bytes_sent, "bytes_received": node.traffic.bytes_received,
        "bytes_sent_by_kind": dict(node.traffic.sent), "bytes_received_by_kind": dict(node.traffic.received),
        "params": sum(t.numel() for t in node.outer.params.values()) if hasattr(node, "outer") else None,
        "inner_steps_total": node.trainer.step_count if hasattr(node, "trainer") else 0,
        "train_started_at": node.train_started_at, "finished_at": time.time(),
        "inner_seconds_total": node.inner_seconds_total, "longest_stall_s": node.longest_stall_s,
        "eval_seconds_total": node.eval_seconds_total,
        "role": node.config.role, "stage": node.membership.me.stage if hasattr(node, "membership") else None,
    }
    driver = getattr(getattr(node, "trainer", None), "driver", None)
    if driver is not None:  # stage 0 of a pipeline replica
        data["pipeline"] = {"microbatch_retries": driver.retries_total, "hop_failovers": driver.failovers_total,
                            "router": node.router.snapshot() if node.router else None, "routes": driver.paths.describe()}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "peer":
            logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
            return asyncio.run(run_peer(peer_config_from(args), args.report))
        from shoal.peer.demo import run_demo

        return run_demo(args)
    except ValueError as exc:  # config validation: the message names the flag
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 2
    except ShoalError as exc:  # refused join, unreachable bootstrap, ...
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
