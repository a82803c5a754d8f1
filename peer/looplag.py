"""How late the event loop runs: a task that sleeps a fixed interval and measures by how
much it overslept.

The event loop serves heartbeats, gossip and every request; work that holds it (packing
a large body, hashing, a tensor copy) delays all of them, and a peer whose loop stalls for
a few seconds looks dead to the others. The lag is the loop's own lateness, measured where
it happens: the most it reached over the last `window_s` is exported as
`shoal_loop_lag_seconds_max` on `/metrics` and gossiped as `loop_lag_ms_max`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class LoopLagMonitor:
    """Measures the loop it runs on: the owner starts `run()` as a task and cancels it.

    `interval_s`: how often it wakes (each wake is one sample); `window_s`: how long a
    sample counts towards `max_lag_s()`; `clock`: seconds, monotonic, for the window only
    (the lag itself is measured with the loop's own clock).
    """

    def __init__(
        self,
        interval_s: float = 0.05,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"loop lag interval_s must be > 0, got {interval_s}")
        if not window_s > 0:
            raise ValueError(f"loop lag window_s must be > 0, got {window_s}")
        self.interval_s, self.window_s, self.clock = interval_s, window_s, clock
        self._samples: deque[tuple[float, float]] = deque()  # (when, lag_s)
        self.last_lag_s = 0.0

    def record(self, lag_s: float) -> None:
        """Note one measurement now (the monitor's own loop calls this)."""
        now = self.clock()
        self.last_lag_s = lag_s
        # a sample below a larger, later one can never be the window's max again
        while self._samples and self._samples[-1][1] <= lag_s:
            self._samples.pop()
        self._samples.append((now, lag_s))
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def max_lag_s(self) -> float:
        """The largest lag measured over the last `window_s` (0 before any)."""
        self._expire(self.clock())
        return self._samples[0][1] if self._samples else 0.0

    async def run(self) -> None:
        """Measure until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, loop.time() - expected))
