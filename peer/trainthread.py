"""The training thread: the one thread of a peer that runs torch work.

Inner steps, encoding our contribution, the outer step, snapshots of the outer state and
evaluation all run here, one job at a time and in submission order, so the model is never
touched by two threads at once and the event loop never runs torch work. A pipeline
driver's inner step waits here for coroutines it hands to the event loop (`on_loop`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from shoal.peer.errors import Stopped

T = TypeVar("T")


def lower_priority(nice: int) -> None:
    """Run the calling thread `nice` steps below the process's CPU priority (best effort:
    Linux sets niceness per thread; elsewhere this may do nothing)."""
    if nice > 0 and hasattr(os, "setpriority"):
        try:
            os.setpriority(
                os.PRIO_PROCESS,
                threading.get_native_id(),
                os.getpriority(os.PRIO_PROCESS, 0) + nice,
            )
        except OSError:
            pass


def worker_pool(workers: int | None, name: str, nice: int) -> ThreadPoolExecutor:
    """An executor whose threads run `nice` below the event loop's thread: on a busy
    machine the loop, which only waits and answers, gets the CPU first."""
    return ThreadPoolExecutor(
        workers, thread_name_prefix=name, initializer=lower_priority, initargs=(nice,)
    )


class TrainingThread:
    def __init__(self, peer_id: str, nice: int = 0) -> None:
        self.peer_id = peer_id
        self.stopping = threading.Event()  # set once: every job checks it between steps
        self._executor = worker_pool(1, f"train-{peer_id}", nice)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the training thread and wait for it (event loop)."""
        self._loop = asyncio.get_running_loop()
        return await self._loop.run_in_executor(self._executor, fn, *args)

    def check(self) -> None:
        """Raise Stopped if the peer is stopping (training thread, between steps)."""
        if self.stopping.is_set():
            raise Stopped()

    def on_loop(self, coroutine: Coroutine[Any, Any, T], poll_s: float = 0.2) -> T:
        """Run `coroutine` on the event loop and wait for it (training thread); cancel it and
        raise Stopped when the peer stops."""
        assert self._loop is not None, "the training thread has run nothing yet"
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        while True:
            try:
                return future.result(timeout=poll_s)
            except concurrent.futures.TimeoutError:
                if self.stopping.is_set():
                    future.cancel()
                    raise Stopped() from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Hand `fn(*args)` to the event loop without waiting (training thread)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    async def close(self) -> None:
        """Stop: set `stopping`, let the running job notice it, and join the thread (off the
        loop: a driver's job may be waiting for a coroutine on it)."""
        self.stopping.set()
        shutdown = functools.partial(self._executor.shutdown, wait=True, cancel_futures=True)
        await asyncio.get_running_loop().run_in_executor(None, shutdown)
