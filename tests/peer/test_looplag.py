"""The loop-lag monitor: a blocked loop shows up, an idle one does not, old samples expire."""

import asyncio
import time

from shoal.peer.looplag import LoopLagMonitor


def test_a_blocked_loop_shows_its_lag():
    async def main():
        monitor = LoopLagMonitor(interval_s=0.02)
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # work that holds the loop
        await asyncio.sleep(0.1)
        task.cancel()
        return monitor.max_lag_s()

    assert asyncio.run(asyncio.wait_for(main(), 10)) >= 0.25


def test_an_idle_loop_has_a_small_lag():
    async def main():
        monitor = LoopLagMonitor(interval_s=0.01)
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.3)
        task.cancel()
        return monitor.max_lag_s(), monitor.last_lag_s

    worst, last = asyncio.run(asyncio.wait_for(main(), 10))
    assert 0.0 <= last <= worst < 0.1


def test_the_max_is_over_the_window_only():
    now = [0.0]
    monitor = LoopLagMonitor(window_s=60.0, clock=lambda: now[0])
    assert monitor.max_lag_s() == 0.0
    monitor.record(0.5)
    now[0] = 30.0
    monitor.record(0.1)
    assert monitor.max_lag_s() == 0.5
    now[0] = 61.0  # the 0.5 s sample is older than the window
    assert monitor.max_lag_s() == 0.1
    monitor.record(0.2)
    assert monitor.max_lag_s() == 0.2
    now[0] = 200.0
    assert monitor.max_lag_s() == 0.0
