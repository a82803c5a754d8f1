"""Every background task of a peer has an owner: `TaskOwner` starts it, sees how it ended,
and cancels it on the way out.

asyncio drops the exception of a task nobody awaits (at best a "never retrieved" line at
garbage collection), so a failed hash check, resync or checkpoint write would vanish and
the peer would go on as if it had worked. Here every task and executor future gets a
done-callback: a failure is logged with the peer id and its traceback, kept for the
dashboard (`failures`), and, for a task the peer cannot go on without (`fatal`), reported
to the owner's `on_fatal`, which stops the peer with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class TaskOwner:
    """Starts, watches and cancels one peer's background tasks.

    Holds a strong reference to every task until it ends (the event loop keeps only weak
    ones, so an unowned task can be garbage-collected mid-flight). A task that ends
    normally or cancelled is forgotten; one that raises is logged with its traceback, kept
    in `failures` (the newest `keep_failures`) and, if `fatal`, passed to `on_fatal`.
    """

    def __init__(
        self,
        peer_id: str,
        on_fatal: Callable[[str, BaseException], None] | None = None,
        keep_failures: int = 20,
    ) -> None:
        self.peer_id = peer_id
        self.on_fatal = on_fatal
        self._failures: deque[dict[str, Any]] = deque(maxlen=keep_failures)
        self._running: dict[asyncio.Future, str] = {}  # strong references until done
        self._closed = False

    def spawn(
        self, coro: Coroutine[Any, Any, Any], *, name: str, fatal: bool = False
    ) -> asyncio.Task:
        """Start `coro` as a task named `name` and watch it."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"peer {self.peer_id} is stopping: cannot start {name}")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        return self.watch(task, name=name, fatal=fatal)

    def watch(self, future: asyncio.Future, *, name: str, fatal: bool = False) -> asyncio.Future:
        """Watch a running future (a task, or an executor job's future) until it ends."""
        self._running[future] = name
        future.add_done_callback(lambda done: self._ended(done, name, fatal))
        return future

    def _ended(self, future: asyncio.Future, name: str, fatal: bool) -> None:
        self._running.pop(future, None)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            return
        log.error(
            "[%s] background task %s failed: %s",
            self.peer_id,
            name,
            exc,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        self._failures.append(
            {"task": name, "error": f"{type(exc).__name__}: {exc}", "time": time.time()}
        )
        if fatal and self.on_fatal is not None:
            try:
                self.on_fatal(name, exc)
            except Exception:  # the loop would log it without the peer id
                log.exception("[%s] on_fatal for %s failed", self.peer_id, name)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Failed tasks, newest last: {"task", "error", "time"}."""
        return list(self._failures)

    def running(self) -> list[asyncio.Future]:
        """Tasks and watched futures not yet done."""
        return [f for f in self._running if not f.done()]

    async def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every task still running and wait for them, at most `timeout_s`; never
        raises their errors. A watched executor job is not cancelled but waited for within
        the same bound: its thread cannot be interrupted, and cancelling its future would
        only hide how it ends (a checkpoint write that fails during shutdown is still
        logged). Called from one of our own tasks, that task is left to its caller."""
        self._closed = True
        current = asyncio.current_task()
        pending = [f for f in self.running() if f is not current]
        for future in pending:
            if isinstance(future, asyncio.Task):
                future.cancel()
        if not pending:
            return
        _, still_running = await asyncio.wait(pending, timeout=timeout_s)
        if still_running:
            names = sorted(self._running.get(f, repr(f)) for f in still_running)
            log.warning(
                "[%s] %d background task(s) still running after %.1f s: %s",
                self.peer_id,
                len(still_running),
                timeout_s,
                ", ".join(names),
            )
