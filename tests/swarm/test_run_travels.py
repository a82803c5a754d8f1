"""The run travels: a peer started with only `--bootstrap` takes the run (a Llama config
with GQA and a BPE tokenizer) from the peer it joins and ends in step with it; a joiner
whose run flags differ is still refused with the list of differences."""

import json
import subprocess
import sys

import pytest
from conftest import peer_url, spawn_peer, wait_for

from shoal.peer.demo import fetch_json

pytestmark = pytest.mark.slow

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


@pytest.fixture(scope="module")
def llama_run(corpus, tmp_path_factory):
    """(config.json path, tokenizer.json path): a tiny GQA Llama and a 512-token BPE."""
    from shoal.train.tokenizer import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("llama")
    config = folder / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    with open(corpus) as f:
        text = f.read()
    train_bpe_tokenizer([text], 512, folder / "tokenizer.json")
    return str(config), str(folder / "tokenizer.json")


ROUNDS = 40  # rounds of ~0.3 s: a joiner that starts at round 2 finds the run going


def bare_joiner(tmp_path, corpus, i: int, bootstrap: str) -> subprocess.Popen:
    """peer-<i> with no run setting: only where to join, and its own data and schedule."""
    cmd = [
        sys.executable,
        "-m",
        "shoal.peer.cli",
        "peer",
        "--listen",
        "127.0.0.1:0",
        "--peer-id",
        f"peer-{i}",
        "--bootstrap",
        bootstrap,
        "--data",
        corpus,
        "--rounds",
        str(ROUNDS),
        "--threads",
        "1",
        "--min-peers",
        "2",
        "--report",
        str(tmp_path / f"peer-{i}.json"),
    ]
    with open(tmp_path / f"peer-{i}.log", "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def test_a_bare_joiner_takes_the_run_and_its_tokenizer(corpus, tmp_path, llama_run, monkeypatch):
    config, tokenizer = llama_run
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    run_flags = ["--tokenizer", tokenizer, "--min-peers", "2", "--warmup-steps", "0"]
    first = spawn_peer(corpus, tmp_path, 0, ROUNDS, 30, run_flags, model=config)
    procs = [first]
    try:
        url = peer_url(tmp_path, 0, first)
        refused = spawn_peer(  # H = 5 where the run has 30, and no --warmup-steps 0
            corpus, tmp_path, 2, ROUNDS, 5, ["--tokenizer", tokenizer], model=config, bootstrap=url
        )
        procs.append(refused)
        assert refused.wait(timeout=60) != 0
        refusal = (tmp_path / "peer-2.log").read_text()
        assert "run config differs" in refusal and "inner_steps: this peer 5, swarm 30" in refusal
        assert "inner.warmup_steps" in refusal

        procs.append(bare_joiner(tmp_path, corpus, 1, url))  # at the start of the run
        peer_url(tmp_path, 1, procs[-1])

        def swarm_round():
            view = fetch_json(url + "/api/swarm")
            return view and min(p["round"] for p in view["peers"]) >= 2 and view

        view = wait_for(swarm_round, 90, "the swarm to pass round 2")
        definition = view["run"]["definition"]["run"]
        assert definition["model"]["n_kv_heads"] == 2 and definition["tokenizer"].startswith(
            "sha256:"
        )
        procs.append(bare_joiner(tmp_path, corpus, 3, url))  # into the running swarm
        for i, proc in zip((0, 1, 3), (first, procs[2], procs[3]), strict=True):
            log = (tmp_path / f"peer-{i}.log").read_text()[-3000:]
            assert proc.wait(timeout=180) == 0, log
        reports = {i: json.loads((tmp_path / f"peer-{i}.json").read_text()) for i in (0, 1, 3)}
        assert len({r["rounds"][-1]["weights_hash"] for r in reports.values()}) == 1
        assert all(r["round"] == ROUNDS for r in reports.values())
        late = reports[3]["rounds"][0]["round"]
        assert late > 2, f"peer-3 should have joined a running swarm, it trained round {late}"
        cached = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
        assert [p.read_bytes() for p in cached] == [open(tokenizer, "rb").read()]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
