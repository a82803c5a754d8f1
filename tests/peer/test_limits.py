"""Request limits are sized from the run: a `large` pipeline hop of fp32 activations fits."""

import pytest

from shoal.peer.config import InnerSettings, OuterSettings, PeerConfig, RunSettings, resolve_run
from shoal.peer.limits import FLOOR_BYTES, hop_bytes, request_limit_bytes
from shoal.peer.protocol_config import ProtocolConfig


def config(model: str, stages: int, **protocol) -> PeerConfig:
    run = resolve_run(RunSettings(model=model, stages=stages), InnerSettings(), OuterSettings())
    return PeerConfig.of(run, protocol=ProtocolConfig(**protocol))


def test_a_large_pipeline_hop_of_fp32_activations_fits():
    cfg = config("large", stages=4)
    # the case: 4 x 1024 x 768 fp32 activations, 12.6 MB, got 413 at a fixed 8 MiB
    microbatch_hop = 4 * 1024 * 768 * 4
    assert microbatch_hop > FLOOR_BYTES
    assert request_limit_bytes(cfg) >= 2 * hop_bytes(cfg) > microbatch_hop
    # a whole batch in one microbatch fits too: the driver never sends more
    assert hop_bytes(cfg) == 32 * 1024 * (4 * 768 + 4)


def test_runs_without_pipelines_keep_the_floor_and_the_flag_overrides():
    assert request_limit_bytes(config("large", stages=0)) == FLOOR_BYTES
    assert request_limit_bytes(config("tiny", stages=2)) == FLOOR_BYTES
    assert request_limit_bytes(config("large", stages=4, max_request_bytes=123456)) == 123456


@pytest.mark.parametrize("bad", [0, -1])
def test_the_override_must_be_positive(bad):
    with pytest.raises(ValueError, match="--max-request-bytes"):
        ProtocolConfig(max_request_bytes=bad)
