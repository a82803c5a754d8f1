"""Every wait has a bound and a message: a peer that cannot go on stops with an error that
names the flag to change, instead of waiting forever."""

from dataclasses import replace

import pytest
from conftest import FAST_PROTOCOL, peer_config, run_async, tiny_run, wait_until

from shoal.peer.node import Peer


async def fails_with(config, flag: str) -> str:
    peer = Peer(config)
    await peer.start()
    try:
        await wait_until(peer.finished.is_set, 30, "the peer to give up")
        with pytest.raises(RuntimeError) as failure:
            await peer.run_until_done()
        assert flag in str(failure.value), failure.value
        assert peer.error is not None
        return str(failure.value)
    finally:
        await peer.stop()


def test_too_few_peers_for_min_peers_is_an_error_not_a_hang(corpus):
    protocol = replace(FAST_PROTOCOL, min_peers_timeout_s=1.0)
    config = peer_config(corpus, "lonely", min_peers=2, protocol=protocol)
    message = run_async(fails_with(config, "--min-peers-timeout"), 60)
    assert "only 1 of the 2 peers" in message


def test_a_driver_without_stage_peers_gives_up_after_the_stall_timeout(corpus):
    protocol = replace(FAST_PROTOCOL, pipeline_stall_timeout_s=1.0)
    config = peer_config(
        corpus, "driver", run=tiny_run(stages=2), role="stage", stage=0, protocol=protocol
    )
    message = run_async(fails_with(config, "--pipeline-stall-timeout"), 60)
    assert "no live peer serves stage(s) [1]" in message
