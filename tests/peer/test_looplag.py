"""The loop-lag monitor: a blocked loop shows up, an idle one does not, old samples expire."""

import asyncio
import contextlib
import time

import pytest

from shoal.peer.looplag import LoopLagMonitor


async def _measure(monitor: LoopLagMonitor, before_s: float, block_s: float, after_s: float):
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(before_s)
    if block_s:
        time.sleep(block_s)  # work that holds the loop
    await asyncio.sleep(after_s)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return monitor.max_lag_s(), monitor.last_lag_s


def test_a_blocked_loop_shows_its_lag():
    monitor = LoopLagMonitor(interval_s=0.02)
    worst, _ = asyncio.run(asyncio.wait_for(_measure(monitor, 0.1, 0.3, 0.1), 10))
    # the monitor woke at most interval_s before the block began: it overslept by >= 0.28 s
    assert worst >= 0.25


def test_an_idle_loop_has_a_small_lag():
    monitor = LoopLagMonitor(interval_s=0.01)
    worst, last = asyncio.run(asyncio.wait_for(_measure(monitor, 0.3, 0.0, 0.0), 10))
    # an idle loop oversleeps by scheduler noise only; the margin is for a loaded CI machine
    assert 0.0 <= last <= worst < 0.15


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
    assert monitor.max_lag_s() == 0.2 and monitor.last_lag_s == 0.2
    now[0] = 200.0
    assert monitor.max_lag_s() == 0.0


def test_a_short_window_forgets_a_stall_on_a_running_loop():
    async def main():
        monitor = LoopLagMonitor(interval_s=0.01, window_s=0.2)
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.05)
        time.sleep(0.3)
        await asyncio.sleep(0.02)
        during = monitor.max_lag_s()
        await asyncio.sleep(0.5)  # more than window_s of quiet samples
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return during, monitor.max_lag_s()

    during, after = asyncio.run(asyncio.wait_for(main(), 10))
    assert during >= 0.25 and after < 0.25


@pytest.mark.parametrize("bad", [{"interval_s": 0}, {"window_s": -1.0}])
def test_settings_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoopLagMonitor(**bad)
