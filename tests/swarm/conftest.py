"""Helpers for multi-peer tests: real peers on 127.0.0.1 with free ports, tiny models,
every wait bounded."""

from __future__ import annotations

import asyncio
import sysconfig
from pathlib import Path

import pytest

from shoal.optim.inner import InnerConfig
from shoal.optim.outer import OuterConfig
from shoal.peer.config import PeerConfig, ProtocolConfig, RunConfig
from shoal.peer.node import Peer
from shoal.train import PRESETS

FAST_PROTOCOL = ProtocolConfig(heartbeat_interval_s=0.5, suspect_after_s=1.5, dead_after_s=3.0, min_gather_timeout_s=8.0, agree_timeout_s=3.0)


def tiny_run(**kw) -> RunConfig:
    base = dict(
        model_preset="tiny", model=PRESETS["tiny"].to_dict(),
        inner=InnerConfig(lr=3e-3, batch_size=4, seq_len=32, warmup_steps=0),
        outer=OuterConfig(codec="int8"), inner_steps=4,
    )
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A small local text corpus (a few stdlib modules) so peers start fast."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in ("argparse.py", "json/decoder.py", "textwrap.py", "string.py"))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return str(path)


def peer_config(corpus: str, peer_id: str, bootstrap: str | None = None, **kw) -> PeerConfig:
    base = dict(run=tiny_run(), peer_id=peer_id, bootstrap=bootstrap, data_path=corpus, listen_port=0, eval_batches=2,
                torch_threads=1, linger_s=5.0, protocol=FAST_PROTOCOL)
    return PeerConfig(**{**base, **kw})


async def start_swarm(corpus: str, n: int, **kw) -> list[Peer]:
    kw.setdefault("min_peers", n)
    first = Peer(peer_config(corpus, "peer-0", **kw))
    await first.start()
    rest = [Peer(peer_config(corpus, f"peer-{i}", bootstrap=first.address, **kw)) for i in range(1, n)]
    await asyncio.gather(*(p.start() for p in rest))
    return [first, *rest]


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



