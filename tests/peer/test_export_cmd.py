"""`shoal export`: a full replica's checkpoint becomes a Hugging Face folder; what cannot
be exported is refused with the reason."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from shoal.peer.checkpoint import save_checkpoint
from shoal.peer.cli import main, run_config_from
from shoal.peer.export_cmd import export_checkpoint
from shoal.train import build_model
from shoal.train.hf import from_hf_state


def checkpoint(folder, run, weights, **extra):
    tensors = {f"outer/{name}": tensor for name, tensor in weights.items()}
    save_checkpoint(folder, 3, tensors, {"run": run.to_dict(), **extra})


def test_export_writes_what_the_checkpoint_holds(tmp_path):
    run = run_config_from({"model": "tiny"})
    weights = dict(build_model("tiny", seed=5).named_parameters())
    checkpoint(tmp_path / "ckpt", run, {n: t.detach() for n, t in weights.items()})
    assert (
        main(["export", "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
        == 0
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    back = from_hf_state(load_file(tmp_path / "hf" / "model.safetensors"), run.model_config())
    assert all(torch.equal(back[n], weights[n].detach()) for n in weights)
    assert not (tmp_path / "hf" / "tokenizer.json").exists()  # a byte-level run has none


def test_export_refuses_a_slice_a_foreign_tokenizer_and_an_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no intact checkpoint"):
        export_checkpoint(str(tmp_path / "none"), str(tmp_path / "out"))
    run = run_config_from({"model": "tiny"})
    weights = {n: t.detach() for n, t in build_model("tiny", seed=0).named_parameters()}
    slice_ = {n: t for n, t in weights.items() if not n.startswith("blocks.1.")}
    checkpoint(tmp_path / "stage", run, slice_)
    with pytest.raises(ValueError, match="does not hold the whole model"):
        export_checkpoint(str(tmp_path / "stage"), str(tmp_path / "out"))
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    ref = "sha256:" + "0" * 64  # the run names another file
    run = run.__class__.from_dict({**run.to_dict(), "tokenizer": ref})
    checkpoint(tmp_path / "tok", run, weights)
    with pytest.raises(ValueError, match="no tokenizer file"):
        export_checkpoint(str(tmp_path / "tok"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="is not the run's tokenizer"):
        export_checkpoint(str(tmp_path / "tok"), str(tmp_path / "out"), str(tokenizer))
    assert hashlib.sha256(b"{}").hexdigest() != ref.removeprefix("sha256:")
