"""The `shoal` command: `shoal peer` runs one peer, `shoal demo` a local swarm, `shoal
tokenize` writes token shards (train/tokenize_cmd.py), `shoal export` a Hugging Face folder
(peer/export_cmd.py).

Every flag comes from a config field (`peer/options.py`); `--config FILE` (TOML) sets the
same settings, and flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.peer.config import (
    SECTIONS,
    DataConfig,
    InnerSettings,
    OuterSettings,
    PeerConfig,
    ProtocolConfig,
    RunConfig,
    RunFiles,
    RunSettings,
    resolve_run,
)
from shoal.peer.errors import ShoalError
from shoal.peer.export_cmd import add_export_parser, export_main
from shoal.peer.identity import Identity
from shoal.peer.options import add_section, build_section, flag_fields, key_name, setting, settle
from shoal.peer.ranks import serve_rank, spawn_ranks, world_from_env
from shoal.peer.runfiles import fetch_run
from shoal.peer.trainthread import worker_pool
from shoal.train.tokenize_cmd import add_tokenize_parser, tokenize_main

log = logging.getLogger("shoal")

RUN_GROUPS: dict[str, type] = {"run": RunSettings, "inner": InnerSettings, "outer": OuterSettings}
PEER_GROUPS: dict[str, type] = {**RUN_GROUPS, **SECTIONS}


@dataclass(frozen=True)
class OutputSettings:
    """What the peer process writes besides its log."""

    report: str | None = setting(
        None,
        "write this peer's round log and traffic as JSON here on exit",
        kind=str,
        metavar="FILE",
    )
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR", metavar="LEVEL")


@dataclass(frozen=True)
class DemoSettings:
    """The local swarm `shoal demo` starts."""

    peers: int = setting(
        3, "full replicas to start (with --stages S, also one pipeline replica of S stage peers)"
    )
    rounds: int = setting(6, "outer rounds every peer trains")
    summary: str | None = setting(
        None, "write the run's summary as JSON here", kind=str, metavar="FILE"
    )
    port: int = setting(0, "the first peer's port (0: a free one)")
    checkpoint_dir: str | None = setting(
        None,
        "keep each peer's checkpoints in DIR/peer-N (for `shoal export`)",
        kind=str,
        metavar="DIR",
    )
    swarm_key: str | None = setting(
        None,
        "shared secret of the demo's peers (default: $SHOAL_SWARM_KEY)",
        kind=str,
        metavar="KEY",
    )


DEMO_GROUPS: dict[str, type] = {
    **RUN_GROUPS,
    "demo": DemoSettings,
    "data": DataConfig,
    "protocol": ProtocolConfig,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal", description="Train one model across many machines over slow links."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = (
        "TOML file of settings: keys are the long flag names with _ for -, at top level or in a "
        "table named after their group ([run], [protocol], ...); flags given here override it"
    )

    def command(name: str, help_text: str, groups: dict[str, type]) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            name,
            help=help_text,
            usage=f"shoal {name} [--config FILE] [FLAG VALUE ...]  (flags by group below)",
        )
        parser.add_argument("--config", metavar="FILE", help=config_help)
        for group, section in groups.items():
            add_section(parser, group, section)
        return parser

    peer = command(
        "peer", "run one peer (the first peer of a run needs no --bootstrap)", PEER_GROUPS
    )
    add_section(peer, "output", OutputSettings)
    command("demo", "a local swarm of peer processes on 127.0.0.1 with a dashboard", DEMO_GROUPS)
    add_tokenize_parser(sub)
    add_export_parser(sub)
    return parser


def run_config_from(values: dict[str, Any]) -> RunConfig:
    """The run these settings define."""
    return resolve_run(*(build_section(section, values) for section in RUN_GROUPS.values()))


def peer_config_from(
    values: dict[str, Any], run: RunConfig | None = None, files: RunFiles | None = None
) -> PeerConfig:
    """The peer these settings define; `run` and `files`: a run learnt from the swarm."""
    values = {"swarm_key": os.environ.get("SHOAL_SWARM_KEY"), **values}
    sections = {
        name: build_section(PEER_GROUPS[name], values)
        for name in ("network", "pipeline", "data", "schedule", "protocol")
    }
    if run is None:
        given = build_section(RunSettings, values)
        run, files = run_config_from(values), RunFiles(given.tokenizer, given.init_from)
    return PeerConfig(run=run, files=files or RunFiles(), **sections)


def run_settings_given(values: dict[str, Any]) -> bool:
    """Whether any setting of the run (a flag or a --config key of its groups) was given."""
    keys = {key_name(f) for section in RUN_GROUPS.values() for f in flag_fields(section)}
    return not keys.isdisjoint(values)


async def configure(values: dict[str, Any]) -> PeerConfig:
    """The peer's config. A peer given `--bootstrap` and no run settings takes the run of
    the peer it joins (`peer/runfiles.py`): the run's definition, and its tokenizer file."""
    bootstrap = values.get("bootstrap")
    if not bootstrap or run_settings_given(values):
        return peer_config_from(values)
    protocol = build_section(ProtocolConfig, values)
    swarm_key = values.get("swarm_key") or os.environ.get("SHOAL_SWARM_KEY")
    path = values.get("identity")  # a closed run (--allow-peers) answers only listed keys
    identity = Identity.load_or_create(path) if path else None
    definition, tokenizer = await fetch_run(bootstrap, swarm_key, protocol, identity)
    log.info(
        "taking the run of %s: %s (definition %s)",
        bootstrap,
        definition.run.model_preset,
        definition.sha256()[:16],
    )
    return peer_config_from(values, definition.run, RunFiles(tokenizer=tokenizer))


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    groups = PEER_GROUPS if args.command == "peer" else DEMO_GROUPS
    extra = {"output": ["report", "log_level"]} if args.command == "peer" else {}
    values = settle(args, groups, extra)
    if args.command == "peer":
        values.setdefault("log_level", "INFO")
    return values


async def start_peer(values: dict[str, Any]) -> int:
    config = await configure(values)
    ranks = []
    if config.schedule.nproc > 1 and "RANK" not in os.environ:  # not launched by torchrun
        ranks = spawn_ranks(config.schedule.nproc, config.schedule.device)
    try:
        return await run_peer(config, values.get("report"), ranks)
    finally:
        stop_ranks(ranks)


async def run_peer(
    config: PeerConfig, report: str | None = None, ranks: list[subprocess.Popen] = ()
) -> int:
    """Run one peer until its rounds are done or it is stopped; `ranks`: the processes of
    its other ranks (`--nproc`), watched: one that exits ends the peer with an error."""
    from shoal.peer.node import Peer

    for warning in (config.network.loopback_warning(), config.network.open_warning()):
        if warning:
            log.warning(warning)
    node = Peer(config)
    loop = asyncio.get_running_loop()
    # this process runs one peer: its byte work (packing, hashing, decoding) yields the CPU
    # to the event loop too, as its training thread does
    loop.set_default_executor(worker_pool(None, "work", config.schedule.compute_nice))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start(
            on_serving=lambda url: print(
                f"shoal peer {node.peer_id} serving {url} (dashboard: {url}/)", flush=True
            )
        )
        done = asyncio.create_task(node.run_until_done())
        exited = asyncio.create_task(rank_exit(ranks))
        waits = {done, exited, asyncio.create_task(stop.wait())}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits - {done}:
            task.cancel()
        if done.done():
            done.result()  # re-raise a training failure: the process exits non-zero
        else:
            done.cancel()
        if exited.done() and not exited.cancelled():
            raise RuntimeError(exited.result())
    finally:
        try:
            if report:
                write_report(node.report(), report)
        finally:
            await node.stop()
    return 0


async def rank_exit(ranks: list[subprocess.Popen]) -> str:
    """Wait until one of the peer's other ranks exits (forever if it has none); what
    happened to it."""
    while True:
        for rank, proc in enumerate(ranks, 1):
            if proc.poll() is not None:
                return f"rank {rank} of this peer exited (code {proc.returncode})"
        await asyncio.sleep(0.2)


def stop_ranks(ranks: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """The other ranks leave when rank 0 tells them or their group breaks; past the grace
    time they are killed, so no process outlives the peer."""
    for proc in ranks:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_report(data: dict[str, Any], path: str) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("tokenize", "export"):
            return (tokenize_main if args.command == "tokenize" else export_main)(args)
        values = settings_of(args)
        rank, world = world_from_env()
        if args.command == "peer" and world > 1:  # launched by torchrun: one peer, N ranks
            if rank > 0:
                return serve_rank(values.get("device", "auto"))
            values["nproc"] = world
        if args.command == "peer":
            logging.basicConfig(
                level=str(values["log_level"]).upper(),
                stream=sys.stderr,
                format="%(asctime)s %(levelname)s %(name)s %(message)s",
            )
            return asyncio.run(start_peer(values))
        from shoal.peer.demo import run_demo

        return run_demo(values)
    except ValueError as exc:  # config validation: the message names the flag
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 2
    except (ShoalError, RuntimeError) as exc:  # refused join, unreachable bootstrap, a failed peer
        print(f"shoal: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
