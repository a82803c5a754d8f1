"""TaskOwner: no background task ends unseen."""

import asyncio
import logging
import time

import pytest

from shoal.peer.tasks import TaskOwner


async def boom(message="disk full"):
    raise OSError(message)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_failure_is_logged_with_the_peer_id_and_recorded(caplog):
    async def main():
        owner = TaskOwner("peer-7")
        task = owner.spawn(boom(), name="checkpoint")
        await asyncio.wait([task])
        await asyncio.sleep(0)  # the done-callback
        return owner

    begin = time.time()
    with caplog.at_level(logging.ERROR):
        owner = run(main())
    assert (
        "[peer-7] background task checkpoint failed" in caplog.text and "Traceback" in caplog.text
    )
    assert [(f["task"], f["error"]) for f in owner.failures] == [
        ("checkpoint", "OSError: disk full")
    ]
    assert begin <= owner.failures[0]["time"] <= time.time()  # unix time, for the dashboard


def test_fatal_failures_reach_the_owner_and_others_do_not():
    fatal = []

    async def main():
        owner = TaskOwner("p", on_fatal=lambda name, exc: fatal.append((name, str(exc))))
        tasks = [
            owner.spawn(boom("a"), name="resync", fatal=True),
            owner.spawn(boom("b"), name="probe"),
        ]
        await asyncio.wait(tasks)
        await asyncio.sleep(0)
        return owner

    owner = run(main())
    assert fatal == [("resync", "a")] and len(owner.failures) == 2


def test_cancelled_and_finished_tasks_record_nothing_and_leave_running():
    async def main():
        owner = TaskOwner("p")
        done = owner.spawn(asyncio.sleep(0), name="quick")
        sleeper = owner.spawn(asyncio.sleep(60), name="sleeper")
        await asyncio.wait([done])
        await asyncio.sleep(0)
        running = owner.running()
        sleeper.cancel()
        await asyncio.wait([sleeper])
        await asyncio.sleep(0)
        return owner, running

    owner, running = run(main())
    assert [t.get_name() for t in running] == ["sleeper"]
    assert owner.failures == [] and owner.running() == []


def test_close_cancels_what_runs_and_refuses_new_tasks():
    async def main():
        owner = TaskOwner("p")
        sleeper = owner.spawn(asyncio.sleep(60), name="gossip")
        await owner.close(timeout_s=5)
        with pytest.raises(RuntimeError, match="stopping"):
            owner.spawn(asyncio.sleep(0), name="late")
        return sleeper

    assert run(main()).cancelled()


def test_watch_sees_an_executor_job_fail():
    def write():
        raise PermissionError("read-only")

    async def main():
        owner = TaskOwner("p")
        future = owner.watch(
            asyncio.get_running_loop().run_in_executor(None, write), name="checkpoint"
        )
        await asyncio.wait([future])
        await asyncio.sleep(0)
        return owner.failures

    assert run(main())[0]["error"] == "PermissionError: read-only"


def test_failures_are_bounded():
    async def main():
        owner = TaskOwner("p", keep_failures=3)
        await asyncio.wait([owner.spawn(boom(str(i)), name=f"t{i}") for i in range(5)])
        await asyncio.sleep(0)
        return owner.failures

    assert [f["task"] for f in run(main())] == ["t2", "t3", "t4"]


def test_a_failing_on_fatal_is_logged_with_the_peer_id(caplog):
    def on_fatal(name, exc):
        raise RuntimeError("handler broke")

    async def main():
        owner = TaskOwner("peer-3", on_fatal=on_fatal)
        await asyncio.wait([owner.spawn(boom(), name="resync", fatal=True)])
        await asyncio.sleep(0)
        return owner.failures

    with caplog.at_level(logging.ERROR):
        failures = run(main())
    assert "[peer-3] on_fatal for resync failed" in caplog.text and len(failures) == 1


def test_close_waits_for_an_executor_job_and_still_sees_it_fail():
    def slow_write():
        time.sleep(0.2)
        raise OSError("disk full")

    async def main():
        owner = TaskOwner("p")
        future = owner.watch(
            asyncio.get_running_loop().run_in_executor(None, slow_write), name="checkpoint"
        )
        await owner.close(timeout_s=5)
        await asyncio.sleep(0)
        return future, owner.failures

    future, failures = run(main())
    assert not future.cancelled() and [f["task"] for f in failures] == ["checkpoint"]


def test_close_is_bounded_by_its_timeout_and_names_what_is_left(caplog):
    async def main():
        owner = TaskOwner("peer-9")
        release = asyncio.Event()

        async def stubborn():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await release.wait()  # ignores the cancel until the test lets it go

        task = owner.spawn(stubborn(), name="stubborn")
        await asyncio.sleep(0)
        begin = time.monotonic()
        await owner.close(timeout_s=0.2)
        seconds = time.monotonic() - begin
        release.set()
        await asyncio.wait_for(task, 1)
        return seconds

    with caplog.at_level(logging.WARNING):
        seconds = run(main())
    assert seconds < 0.2 + 1.0  # the close bound plus a margin
    assert "[peer-9] 1 background task(s) still running after 0.2 s: stubborn" in caplog.text


def test_close_from_an_owned_task_does_not_cancel_that_task():
    async def main():
        owner = TaskOwner("p")
        other = owner.spawn(asyncio.sleep(60), name="gossip")

        async def shut_down():
            await owner.close(timeout_s=5)
            return "closed"

        stopper = owner.spawn(shut_down(), name="stop")
        return await asyncio.wait_for(stopper, 5), other.cancelled()

    assert run(main()) == ("closed", True)
