"""The state publisher: snapshots frozen where taken, served with extras, checkpoints
written in the background and their failures seen by the task owner."""

import asyncio

import torch

from shoal.optim.outer import OuterConfig
from shoal.optim.registry import build_outer
from shoal.peer.checkpoint import load_latest
from shoal.peer.publisher import StatePublisher, take_snapshot
from shoal.peer.statesync import StateServer
from shoal.peer.tasks import TaskOwner


def outer():
    return build_outer(
        {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, OuterConfig(codec="fp32")
    )


def test_a_snapshot_is_frozen_and_carries_the_weights_hash():
    opt = outer()
    snapshot = take_snapshot(opt, 4)
    assert snapshot.round_id == 4 and snapshot.weights_hash == opt.weights_hash()
    opt.params["w"].add_(1.0)  # the live state moves on; the snapshot does not
    assert torch.equal(
        snapshot.tensors["outer/w"], torch.arange(6, dtype=torch.float32).reshape(2, 3)
    )


def test_publish_serves_the_snapshot_with_extras_and_checkpoints_it(tmp_path):
    async def main():
        server, tasks = StateServer(1 << 20), TaskOwner("p")
        publisher = StatePublisher("p", server, tasks, str(tmp_path), {"peer": "p"})
        publisher.publish(take_snapshot(outer(), 2))
        publisher.set_extra({"stage0/outer/x": torch.ones(2)}, {"stage0/round": 2})
        blob = await server.latest()
        publisher.close()
        await tasks.close()
        return blob, tasks.failures

    blob, failures = asyncio.run(asyncio.wait_for(main(), 30))
    from shoal.peer.statesync import parse_state

    round_id, tensors, meta = parse_state(blob.data, {"outer/w": (2, 3), "stage0/outer/x": (2,)})
    # nothing peer-specific in a served blob: replicas in step serve identical ones
    assert round_id == 2 and meta == {"stage0/round": 2} and not failures
    loaded = load_latest(tmp_path)
    assert loaded is not None and loaded[1]["round"] == 2


def test_a_failed_checkpoint_write_is_recorded_not_lost(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the checkpoint folder should be")

    async def main():
        tasks = TaskOwner("p")
        publisher = StatePublisher("p", StateServer(1 << 20), tasks, str(blocker), {})
        publisher.publish(take_snapshot(outer(), 1))
        publisher.close()
        for _ in range(50):  # the done-callback runs on the loop after the write failed
            if tasks.failures:
                break
            await asyncio.sleep(0.02)
        await tasks.close()
        return tasks.failures

    failures = asyncio.run(asyncio.wait_for(main(), 30))
    assert len(failures) == 1 and "checkpoint of round 1" in failures[0]["task"]
    assert "[p]" in caplog.text


def test_round_zero_is_served_but_not_checkpointed(tmp_path):
    async def main():
        tasks = TaskOwner("p")
        publisher = StatePublisher("p", StateServer(1 << 20), tasks, str(tmp_path), {})
        publisher.publish(take_snapshot(outer(), 0))
        publisher.close()
        await tasks.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert load_latest(tmp_path) is None
