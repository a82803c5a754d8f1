"""A peer writes a checkpoint every round and `resume` continues from the latest."""

from conftest import peer_config, run_async, wait_until

from shoal.peer.checkpoint import list_checkpoints
from shoal.peer.node import Peer


def test_resume_continues_from_latest_checkpoint(corpus, tmp_path):
    async def scenario():
        first = Peer(peer_config(corpus, "solo", checkpoint_dir=str(tmp_path), max_rounds=3))
        await first.start()
        try:
            await wait_until(first.finished.is_set, 60, "3 rounds")
        finally:
            await first.stop()
        assert list_checkpoints(tmp_path) == [1, 2, 3]
        final_hash = first.round_log[-1]["weights_hash"]

        again = Peer(
            peer_config(corpus, "solo", checkpoint_dir=str(tmp_path), resume=True, max_rounds=4)
        )
        await again.start()
        try:
            assert again.outer_round == 3 and again.engine.outer.weights_hash() == final_hash
            momentum = again.engine.outer.momentum  # momentum came back too, not zeros
            assert any(float(t.abs().sum()) > 0 for t in momentum.values())
            await wait_until(again.finished.is_set, 60, "round 4")
            assert [r["round"] for r in again.round_log] == [4]
        finally:
            await again.stop()

    run_async(scenario(), 120)
