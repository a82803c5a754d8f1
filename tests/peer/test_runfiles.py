"""The run definition a joiner receives, the files it names by hash, and the run settings
that resolve into it (tokenizer, --init-from, --batch-tokens, models from config.json)."""

import hashlib
import json

import pytest
import torch

from shoal.optim.inner import InnerConfig, InnerTrainer
from shoal.peer.cli import build_parser, run_config_from, run_settings_given, settings_of
from shoal.peer.errors import ConfigMismatch, ProtocolError
from shoal.peer.runconfig import RunConfig
from shoal.peer.runfiles import (
    RunDefinition,
    init_sha256,
    keep_tokenizer,
    read_answer,
    run_answer,
)
from shoal.train import build_model


def settings(*flags: str) -> dict:
    return settings_of(build_parser().parse_args(["peer", *flags]))


def tiny_run(**overrides) -> RunConfig:
    return run_config_from({"model": "tiny", **overrides})


def test_definition_answer_round_trips_and_every_hash_is_checked(tmp_path):
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_bytes(b'{"version": "1.0"}')
    ref = "sha256:" + hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    run = RunConfig.from_dict({**tiny_run().to_dict(), "tokenizer": ref})
    definition = RunDefinition(run, data_manifest_sha256="ab" * 32)
    answer = run_answer(definition, str(tokenizer))
    got, data = read_answer(answer)
    assert got == definition and data == tokenizer.read_bytes()
    assert got.sha256() == definition.sha256() != RunDefinition(run).sha256()

    with pytest.raises(ProtocolError, match="hash"):  # a definition that is not its hash's
        read_answer({**answer, "sha256": "0" * 64})
    with pytest.raises(ProtocolError, match="tokenizer"):  # another file than the run names
        read_answer({**answer, "tokenizer": b"{}"})
    with pytest.raises(ProtocolError, match="tokenizer"):
        read_answer({**answer, "tokenizer": None})
    with pytest.raises(ProtocolError):
        read_answer({"definition": [1, 2], "sha256": "x"})
    bad = json.loads(json.dumps(answer["definition"]))
    bad["run"]["model"]["n_heads"] = 3  # d_model 32 does not split into 3 heads
    with pytest.raises(ConfigMismatch):
        RunDefinition.from_dict(bad)


def test_a_byte_run_sends_no_tokenizer():
    answer = run_answer(RunDefinition(tiny_run()), None)
    assert answer["tokenizer"] is None
    assert read_answer(answer) == (RunDefinition(tiny_run()), None)


def test_run_config_refuses_malformed_file_references():
    base = tiny_run().to_dict()
    for field, value in (("tokenizer", "sha256:xyz"), ("init", "md5:" + "0" * 64)):
        with pytest.raises(ConfigMismatch, match=field):
            RunConfig.from_dict({**base, field: value})
    old = {k: v for k, v in base.items() if k not in ("tokenizer", "init")}
    assert RunConfig.from_dict(old) == tiny_run()  # an older peer's dict: bytes, seeded


def test_tokenizer_cache_is_by_hash_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    path = keep_tokenizer(b"tokens")
    assert path.read_bytes() == b"tokens"
    assert path.name == hashlib.sha256(b"tokens").hexdigest() + ".json"
    assert keep_tokenizer(b"tokens") == path
    assert keep_tokenizer(b"other", tmp_path / "ckpt") == tmp_path / "ckpt" / "tokenizer.json"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_init_hash_covers_config_and_weights(tmp_path):
    with pytest.raises(ValueError, match="missing config.json, model.safetensors"):
        init_sha256(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = init_sha256(tmp_path)
    (tmp_path / "README.md").write_text("not part of the model")
    assert init_sha256(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert init_sha256(tmp_path) != first
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model-1.safetensors"):
        init_sha256(tmp_path)


def test_run_settings_given_tells_a_bare_joiner():
    assert not run_settings_given(settings("--bootstrap", "http://127.0.0.1:1", "--data", "x"))
    assert run_settings_given(settings("--bootstrap", "http://127.0.0.1:1", "--model", "tiny"))
    assert run_settings_given(settings("--inner-lr", "0.1"))


def test_batch_tokens_sets_gradient_accumulation():
    run = tiny_run(batch_tokens=4 * 8 * 64, batch_size=8, seq_len=64, warmup_steps=0)
    assert run.inner.grad_accum == 4 and run.inner.warmup_steps == 0
    with pytest.raises(ValueError, match="multiple"):
        tiny_run(batch_tokens=1000, batch_size=8, seq_len=64)
    with pytest.raises(ValueError, match="full replicas"):
        run_config_from({"model": "tiny-deep", "stages": 2, "batch_tokens": 2 * 8 * 64})


def test_accumulated_step_equals_one_step_on_the_whole_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (8, 17), generator=generator)
    x, y = ids[:, :-1], ids[:, 1:]

    def trained(config: InnerConfig, batches) -> dict[str, torch.Tensor]:
        trainer = InnerTrainer(
            build_model("tiny", seed=0), config, iter(batches), torch.device("cpu")
        )
        trainer.run(1)
        return trainer.local_weights()

    whole = trained(InnerConfig(lr=1e-2, batch_size=8, seq_len=16), [(x, y)])
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    accumulated = trained(InnerConfig(lr=1e-2, batch_size=4, seq_len=16, grad_accum=2), halves)
    for name, tensor in whole.items():
        # AdamW's first step is about lr·sign(g): a wrong sum would move weights by ~2·lr
        torch.testing.assert_close(accumulated[name], tensor, atol=1e-5, rtol=0)


def test_a_bare_joiner_with_no_bootstrap_to_reach_gets_a_clear_error():
    import asyncio

    from shoal.peer.cli import configure
    from shoal.peer.errors import ShoalError

    values = settings("--bootstrap", "http://127.0.0.1:1", "--join-timeout", "0.5")
    with pytest.raises(ShoalError, match="cannot reach bootstrap http://127.0.0.1:1"):
        asyncio.run(asyncio.wait_for(configure(values), 20))
