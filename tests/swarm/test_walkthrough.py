"""The README's walk-through of a real run, end to end: a BPE tokenizer trained on local
text → `shoal tokenize` → `shoal demo` of 3 peers training a tiny Llama config with GQA on
the token shards → `shoal export` → transformers' `from_pretrained` computes shoal's
logits."""

import json
import subprocess
import sys

import pytest
import torch
from test_run_travels import TINY_LLAMA

from shoal.peer.checkpoint import load_latest
from shoal.peer.cli import main
from shoal.train.data import stdlib_source_files
from shoal.train.hf import build_model_from, model_config_from_hf
from shoal.train.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.slow

WALK_LLAMA = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 192}
ROUNDS = 20


def test_tokenize_demo_export_load(tmp_path):
    transformers = pytest.importorskip("transformers")
    texts, size = [], 0
    for path in stdlib_source_files():  # the first 1 MB of this Python's standard library
        texts.append(path.read_text(errors="replace"))
        size += len(texts[-1])
        if size > 1_000_000:
            break
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts))
    train_bpe_tokenizer(texts, 512, tmp_path / "tokenizer.json")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(WALK_LLAMA))
    shards = tmp_path / "shards"
    tokenize = ["tokenize", "--tokenizer", str(tmp_path / "tokenizer.json")]
    assert main([*tokenize, "--data", str(corpus), "--out", str(shards)]) == 0
    assert (shards / "manifest.json").is_file()

    demo = [  # the first round falls within the warmup, as a real run's does
        *("--peers", "3", "--rounds", str(ROUNDS), "--model", str(config)),
        *("--tokenizer", str(tmp_path / "tokenizer.json"), "--data", str(shards)),
        *("--inner-steps", "10", "--batch-size", "16", "--seq-len", "64"),
        *("--inner-lr", "0.005", "--warmup-steps", "40"),
        *("--summary", str(tmp_path / "summary.json")),
        *("--checkpoint-dir", str(tmp_path / "checkpoints")),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "shoal.peer.cli", "demo", *demo],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_weights_agree"] and summary["rounds"] == ROUNDS
    first, last = summary["eval_loss_first"], summary["eval_loss_last"]
    assert last <= 0.7 * first, summary["eval_loss_per_round"]

    out = tmp_path / "hf"
    checkpoint = tmp_path / "checkpoints" / "peer-0"
    assert main(["export", "--checkpoint-dir", str(checkpoint), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    tensors, _ = load_latest(checkpoint)
    weights = {n.removeprefix("outer/"): t for n, t in tensors.items() if n.startswith("outer/")}
    ours = build_model_from(weights, model_config_from_hf(WALK_LLAMA)).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    ids = torch.randint(0, WALK_LLAMA["vocab_size"], (2, 48))
    with torch.no_grad():
        expected, _ = ours(ids)
        got = theirs.eval()(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
