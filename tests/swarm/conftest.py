"""Helpers for multi-peer tests: real peers on 127.0.0.1 with free ports, tiny models,
every wait bounded."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from shoal.optim.inner import InnerConfig
from shoal.optim.outer import OuterConfig
from shoal.peer.client import PeerClient, Traffic
from shoal.peer.config import PeerConfig, ProtocolConfig, RunConfig
from shoal.peer.demo import fetch_json, serving_url
from shoal.peer.node import Peer
from shoal.peer.wire import WireCodec
from shoal.train import PRESETS

FAST_PROTOCOL = ProtocolConfig(
    heartbeat_interval_s=0.5,
    suspect_after_s=1.5,
    dead_after_s=3.0,
    min_gather_timeout_s=8.0,
    agree_timeout_s=3.0,
)


def tiny_run(**kw) -> RunConfig:
    base = dict(
        model_preset="tiny",
        model=PRESETS["tiny"].to_dict(),
        inner=InnerConfig(lr=3e-3, batch_size=4, seq_len=32, warmup_steps=0),
        outer=OuterConfig(codec="int8"),
        inner_steps=4,
    )
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A small local text corpus (a few stdlib modules) so peers start fast."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(
        (stdlib / name).read_text()
        for name in ("argparse.py", "json/decoder.py", "textwrap.py", "string.py")
    )
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return str(path)


def peer_config(corpus: str, peer_id: str, bootstrap: str | None = None, **kw) -> PeerConfig:
    base = dict(
        run=tiny_run(),
        peer_id=peer_id,
        bootstrap=bootstrap,
        data_path=corpus,
        listen_port=0,
        eval_batches=2,
        torch_threads=1,
        linger_s=5.0,
        protocol=FAST_PROTOCOL,
    )
    return PeerConfig.of(**{**base, **kw})


async def start_swarm(corpus: str, n: int, train: bool = True, **kw) -> list[Peer]:
    """peer-0, then n - 1 peers joining it at once (`train` False: they only serve and
    gossip)."""
    kw.setdefault("min_peers", n)
    first = Peer(peer_config(corpus, "peer-0", **kw))
    await first.start(train=train)
    rest = [
        Peer(peer_config(corpus, f"peer-{i}", bootstrap=first.address, **kw)) for i in range(1, n)
    ]
    await asyncio.gather(*(p.start(train=train) for p in rest))
    return [first, *rest]


async def client_of(
    peer: Peer, client_id: str, key: str, traffic: Traffic | None = None
) -> PeerClient:
    """A started client named `client_id` in `peer`'s swarm (swarm key `key`): a test that
    talks to one peer as another would."""
    wire = WireCodec(client_id, peer.wire.swarm_id, key, max_body_bytes=1 << 20)
    traffic = traffic if traffic is not None else Traffic()
    client = PeerClient(wire, traffic, request_timeout_s=5, max_response_bytes=1 << 20)
    await client.start()
    return client


async def stop_all(peers: list[Peer]) -> None:
    await asyncio.gather(*(p.stop() for p in peers), return_exceptions=True)


async def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)


def run_async(coro, timeout_s: float = 120.0):
    """Run a test coroutine with a hard bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


# ---- peers as separate processes (for SIGKILL) ------------------------------------------


def swarm_view(url: str):
    return fetch_json(url + "/api/swarm")


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def spawn_peer(
    corpus,
    tmp_path,
    i: int,
    rounds: int,
    inner_steps: int,
    extra: list[str],
    model: str = "tiny",
    bootstrap: str | None = None,
    launcher: tuple[str, ...] = ("-m", "shoal.peer.cli"),
) -> subprocess.Popen:
    """`shoal peer` process peer-<i> on 127.0.0.1, port 0, tiny settings, logging and
    reporting to tmp_path (see `peer_processes`; `peer_url` reads the URL it serves at).
    `launcher`: how the interpreter runs the CLI (e.g. `-c` code that patches it first)."""
    cmd = [
        sys.executable,
        *launcher,
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--peer-id",
        f"peer-{i}",
        "--model",
        model,
        "--inner-steps",
        str(inner_steps),
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--inner-lr",
        "0.003",
        "--data",
        corpus,
        "--rounds",
        str(rounds),
        "--threads",
        "1",
        "--report",
        str(tmp_path / f"peer-{i}.json"),
        *extra,
    ]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    with open(tmp_path / f"peer-{i}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def peer_url(tmp_path, i: int, proc: subprocess.Popen, timeout_s: float = 60) -> str:
    """The URL peer-<i> reports once it serves (it listens on port 0)."""
    return serving_url(tmp_path / f"peer-{i}.log", proc, timeout_s)


@contextlib.contextmanager
def peer_processes(
    corpus, tmp_path, rounds: int, inner_steps: int, flags: list[list[str]], model: str = "tiny"
):
    """One `shoal peer` process per entry of `flags` (its extra flags), each on port 0, tiny
    model, all bootstrapping from peer-0 and waiting for each other; each writes its report
    and log to tmp_path. Yields (processes, urls) and kills whatever still runs on the way out."""
    procs, first = [], None
    try:
        for i, extra in enumerate(flags):
            procs.append(
                spawn_peer(
                    corpus,
                    tmp_path,
                    i,
                    rounds,
                    inner_steps,
                    [*extra, "--min-peers", str(len(flags))],
                    model,
                    first,
                )
            )
            if i == 0:
                first = peer_url(tmp_path, 0, procs[0])
        yield procs, [first, *(peer_url(tmp_path, i, p) for i, p in enumerate(procs) if i)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
