"""--init-from: a run that starts from a Hugging Face checkpoint. The founder loads the
files (their hash is part of the run); a peer without them takes the same weights from
the swarm at round 0; what it trains exports back to the same logits."""

import torch
from conftest import peer_config, run_async, stop_all, tiny_run
from test_run_travels import TINY_LLAMA

from shoal.peer.cli import run_config_from
from shoal.peer.config import RunFiles
from shoal.peer.node import Peer
from shoal.train.hf import build_model_from, export_hf, load_hf_weights, model_config_from_hf
from shoal.train.model import build_model


def test_init_from_weights_reach_every_peer(corpus, tmp_path):
    config = model_config_from_hf(TINY_LLAMA)
    source = build_model(config, seed=123)  # not the run's seed: weights only the files hold
    export_hf(dict(source.named_parameters()), config, tmp_path / "hf")
    run = run_config_from(
        {"init_from": str(tmp_path / "hf"), "batch_size": 4, "seq_len": 32, "inner_steps": 2}
    )
    assert run.init is not None and run.model_config() == config
    assert run.model_preset == "hf"

    async def scenario():
        founder = Peer(
            peer_config(corpus, "peer-0", run=run, files=RunFiles(init_from=str(tmp_path / "hf")))
        )
        await founder.start(train=False)
        joiner = Peer(peer_config(corpus, "peer-1", run=run, bootstrap=founder.address))
        try:
            await joiner.start(train=False)
            return [dict(p.engine.outer.params) for p in (founder, joiner)]
        finally:
            await stop_all([founder, joiner])

    founder_weights, joiner_weights = run_async(scenario(), 60)
    _, files = load_hf_weights(tmp_path / "hf")
    for name, tensor in files.items():
        assert torch.equal(founder_weights[name], tensor), name
        assert torch.equal(joiner_weights[name], tensor), name
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        expected, _ = source(ids)
        got, _ = build_model_from(joiner_weights, config)(ids)
    assert torch.equal(got, expected)


def test_init_from_must_match_an_explicit_model(tmp_path):
    config = model_config_from_hf(TINY_LLAMA)
    export_hf(dict(build_model(config, seed=0).named_parameters()), config, tmp_path / "hf")
    try:
        run_config_from({"init_from": str(tmp_path / "hf"), "model": "tiny"})
    except ValueError as exc:
        assert "differs from --init-from" in str(exc)
    else:
        raise AssertionError("a --model that differs from --init-from's config was accepted")
    assert tiny_run().init is None
