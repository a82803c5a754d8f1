import argparse
import hashlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from shoal.train import (
    ByteData,
    ByteTokenizer,
    HFTokenizer,
    TokenData,
    TokenStream,
    load_corpus,
    load_data,
    load_tokenizer,
    shard_for,
)
from shoal.train.data import split_pieces
from shoal.train.tokenize_cmd import add_tokenize_parser, tokenize_corpus, tokenize_main
from shoal.train.tokenizer import train_bpe_tokenizer
from shoal.train.tokens import MANIFEST, file_sha256

SHARD_TOKENS = 20_000  # small, so the fixture corpus spans several train files


@pytest.fixture(scope="module")
def docs() -> list[bytes]:
    """~300 KB of the standard library's sources: real text, always present."""
    picked, total = [], 0
    for doc in load_corpus(None):
        if total > 300_000:
            break
        picked.append(doc)
        total += len(doc)
    return picked


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokens")


@pytest.fixture(scope="module")
def tok(docs, workdir) -> HFTokenizer:
    return train_bpe_tokenizer((d.decode() for d in docs), 512, workdir / "tok.json")


@pytest.fixture(scope="module")
def corpus_dir(docs, workdir):
    folder = workdir / "corpus"
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"doc-{i:04d}.py").write_bytes(doc)
    return folder


@pytest.fixture(scope="module")
def out1(tok, corpus_dir, workdir):
    out = workdir / "out1"
    tokenize_corpus(tok.path, str(corpus_dir), out, workers=1, shard_tokens=SHARD_TOKENS)
    return out


def read_ids(folder) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, eval ids) of a tokenized folder, read plainly from the files."""
    manifest = json.loads((folder / MANIFEST).read_text())
    train = [np.fromfile(folder / s["name"], dtype="<u2") for s in manifest["shards"]]
    return np.concatenate(train), np.fromfile(folder / manifest["eval"]["name"], dtype="<u2")


def contains(haystack: np.ndarray, needle: np.ndarray) -> bool:
    hay, pin = haystack.tobytes(), needle.astype(haystack.dtype).tobytes()
    at = hay.find(pin)
    while at != -1 and at % haystack.itemsize:  # a match must start on an id boundary
        at = hay.find(pin, at + 1)
    return at != -1


# ---- tokenizers ---------------------------------------------------------------------


def test_byte_tokenizer():
    tokenizer = load_tokenizer(None)
    assert isinstance(tokenizer, ByteTokenizer) and isinstance(
        load_tokenizer("bytes"), ByteTokenizer
    )
    assert (tokenizer.name, tokenizer.vocab_size, tokenizer.eos_id) == ("bytes", 256, 0)
    assert tokenizer.sha256 is None and tokenizer.path is None
    assert (
        tokenizer.encode("hé") == [104, 0xC3, 0xA9] and tokenizer.decode([104, 0xC3, 0xA9]) == "hé"
    )


def test_hf_tokenizer_properties(tok, workdir):
    assert tok.vocab_size == 512 and tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.sha256 == hashlib.sha256((workdir / "tok.json").read_bytes()).hexdigest()
    text = "def f(x):\n    return x + 1  # ünïcode\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "a"]) == [tok.encode(text), tok.encode("a")]
    assert tok.eos_id not in tok.encode(text)  # no special tokens added
    if hasattr(tok._tokenizer, "encode_special_tokens"):
        assert tok.eos_id not in tok.encode("quoted <|endoftext|> in a document")


def test_load_tokenizer_from_a_checkpoint_folder(tok, tmp_path):
    shutil.copy(tok.path, tmp_path / "tokenizer.json")
    assert load_tokenizer(str(tmp_path)).sha256 == tok.sha256


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))


def _bare_tokenizer(path, specials):
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    bare.add_special_tokens(specials)
    bare.save(str(path))
    return path


def test_eos_needed_and_the_pretraining_one_preferred(tmp_path):
    with pytest.raises(ValueError, match="no end-of-document token.*add it"):
        HFTokenizer(_bare_tokenizer(tmp_path / "none.json", ["<pad>"]))
    llama3_like = _bare_tokenizer(tmp_path / "l3.json", ["<|eot_id|>", "<|end_of_text|>"])
    tokenizer = load_tokenizer(str(llama3_like))
    assert tokenizer.eos_id == tokenizer.token_to_id("<|end_of_text|>")


def test_truncation_in_the_file_is_switched_off(tok, tmp_path):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(tok.path)
    raw.enable_truncation(max_length=8)
    raw.save(str(tmp_path / "trunc.json"))
    text = "x = 1\n" * 50
    assert len(load_tokenizer(str(tmp_path / "trunc.json")).encode(text)) == len(tok.encode(text))


# ---- token streams ------------------------------------------------------------------


def test_token_stream_slices_without_copying_and_windows_cross_pieces():
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 60000, n).astype(np.uint16) for n in (7, 1, 30, 0, 12)]
    whole = np.concatenate(pieces)
    stream = TokenStream(pieces)
    assert len(stream) == len(whole) == 50
    part = stream.slice(5, 40)
    assert len(part) == 35 and np.array_equal(part.read(0, 35), whole[5:40])
    assert all(any(np.shares_memory(v, p) for p in pieces) for v in part.pieces)
    starts = np.arange(0, len(whole) - 9)
    assert np.array_equal(stream.windows(starts, 10), whole[starts[:, None] + np.arange(10)])
    assert stream.windows(starts, 10).dtype == np.int64
    with pytest.raises(IndexError):
        stream.windows(np.array([45]), 10)
    with pytest.raises(ValueError, match="1-D"):
        TokenStream([np.zeros(3, dtype=np.int64)])


# ---- shoal tokenize -----------------------------------------------------------------


def test_workers_give_identical_folders(tok, corpus_dir, out1, workdir):
    out2 = workdir / "out2"
    tokenize_corpus(tok.path, str(corpus_dir), out2, workers=2, shard_tokens=SHARD_TOKENS)
    names = sorted(p.name for p in out1.iterdir())
    assert names == sorted(p.name for p in out2.iterdir())
    assert len([n for n in names if n.startswith("train-")]) >= 3
    assert all((out1 / n).read_bytes() == (out2 / n).read_bytes() for n in names)


def test_manifest_fields_and_hashes(tok, docs, out1, corpus_dir):
    manifest = json.loads((out1 / MANIFEST).read_text())
    assert (manifest["format"], manifest["version"], manifest["dtype"]) == (
        "shoal-tokens",
        1,
        "uint16",
    )
    assert manifest["tokenizer"] == {"sha256": tok.sha256, "vocab_size": 512, "eos_id": tok.eos_id}
    assert manifest["eval_fraction"] == 0.03 and manifest["source"] == str(corpus_dir)
    assert manifest["text_bytes"] == sum(map(len, docs))
    shards = manifest["shards"]
    assert [s["name"] for s in shards] == [f"train-{i:05d}.bin" for i in range(len(shards))]
    assert all(s["tokens"] == SHARD_TOKENS for s in shards[:-1]) and shards[-1]["tokens"] > 0
    for entry in [*shards, manifest["eval"]]:
        path = out1 / entry["name"]
        assert path.stat().st_size == 2 * entry["tokens"]
        assert file_sha256(path) == entry["sha256"]
    assert not [p for p in out1.iterdir() if p.name.endswith(".tmp")]


def test_pieces_are_tokenized_in_order_and_separated_by_eos(tok, docs, out1):
    train, evals = read_ids(out1)
    assert train.dtype == np.uint16 and evals.max() < 512
    eval_pieces, train_pieces = split_pieces(docs, 0.03)
    for ids, pieces in ((train, train_pieces), (evals, eval_pieces)):
        cuts = np.flatnonzero(ids == tok.eos_id)
        segments = np.split(ids, cuts)
        assert len(segments) == len(pieces)
        for i, (segment, piece) in enumerate(zip(segments, pieces, strict=True)):
            body = segment[1:] if i else segment  # every segment but the first opens with EOS
            assert body.tolist() == tok.encode(piece.decode("utf-8", errors="replace"))


def test_rerun_into_the_same_folder_replaces_it(tok, corpus_dir, workdir, out1):
    out = workdir / "rerun"
    tokenize_corpus(tok.path, str(corpus_dir), out, shard_tokens=SHARD_TOKENS)
    tokenize_corpus(tok.path, str(corpus_dir), out, shard_tokens=10 * SHARD_TOKENS)
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(p.name for p in out.glob("train-*.bin")) == [
        s["name"] for s in manifest["shards"]
    ]
    assert np.array_equal(read_ids(out)[0], read_ids(out1)[0])


def test_cli_entry_point(tok, corpus_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_tokenize_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["tokenize", "--tokenizer", tok.path, "--data", str(corpus_dir), "--out", str(tmp_path)]
    )
    assert (args.workers, args.eval_fraction, args.shard_tokens) == (1, 0.03, 100_000_000)
    assert tokenize_main(args) == 0
    assert (tmp_path / MANIFEST).is_file() and "MB/s" in capsys.readouterr().err
    args.tokenizer = "bytes"
    assert tokenize_main(args) == 2
    assert "needs no tokenizing" in capsys.readouterr().err


# ---- TokenData ----------------------------------------------------------------------


def test_folder_and_in_memory_data_agree(tok, docs, out1):
    disk = TokenData.from_folder(out1, tok, num_shards=4)
    memory = TokenData.from_documents(docs, tok, num_shards=4)
    assert disk.fingerprint() == memory.fingerprint()
    assert len(disk.train_stream) == len(memory.train_stream) and len(disk.train_stream.pieces) > 1
    for (x1, y1), (x2, y2) in zip(
        disk.eval_batches(4, 32, 3), memory.eval_batches(4, 32, 3), strict=True
    ):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    a, b = (
        disk.train_batches("peer-2", 8, 64, seed=1),
        memory.train_batches("peer-2", 8, 64, seed=1),
    )
    for _ in range(3):
        assert torch.equal(next(a)[0], next(b)[0])
    assert disk.manifest_sha256 == hashlib.sha256((out1 / MANIFEST).read_bytes()).hexdigest()
    assert memory.manifest_sha256 is None and disk.vocab_size == memory.vocab_size == 512


def test_train_windows_in_range_and_from_the_peer_shard(tok, out1):
    data = TokenData.from_folder(out1, tok, num_shards=4)
    peer = "peer-1"
    shard = data.peer_shard(peer)
    lo, hi = data.shard_ranges[shard_for(peer, 4)]
    assert len(shard) == hi - lo and sum(b - a for a, b in data.shard_ranges) == len(
        data.train_stream
    )
    ids = shard.read(0, len(shard))
    batches = data.train_batches(peer, batch_size=4, seq_len=48, seed=0)
    for _ in range(5):
        x, y = next(batches)
        assert x.shape == y.shape == (4, 48) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]) and 0 <= int(x.min()) and int(x.max()) < 512
        for row in range(4):
            assert contains(ids, torch.cat([x[row], y[row, -1:]]).numpy())
    other = next(
        p for p in (f"peer-{i}" for i in range(20)) if shard_for(p, 4) != shard_for(peer, 4)
    )
    assert not np.array_equal(data.peer_shard(other).read(0, 100), ids[:100])


def test_corrupt_truncated_and_missing_files_are_named(tok, out1, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(out1, folder)
    victim = folder / "train-00001.bin"
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 1
    victim.write_bytes(raw)
    data = TokenData.from_folder(folder, tok, num_shards=1)  # sizes fine: hashes are lazy
    with pytest.raises(ValueError, match=r"train-00001\.bin: sha256 .* differs"):
        data.train_batches("peer-0", 2, 16, seed=0)  # one shard: every file is this peer's
    with pytest.raises(ValueError, match="train-00001.bin"):
        data.verify()
    victim.write_bytes(raw[:-2])
    with pytest.raises(ValueError, match=r"train-00001\.bin holds .* truncated"):
        TokenData.from_folder(folder, tok)
    (folder / "eval.bin").unlink()
    victim.unlink()
    with pytest.raises(ValueError, match=r"train-00001\.bin is missing"):
        load_data(str(folder), tok)


def test_corrupt_eval_file_is_found_before_evaluating(tok, out1, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(out1, folder)
    raw = bytearray((folder / "eval.bin").read_bytes())
    raw[0] ^= 1
    (folder / "eval.bin").write_bytes(raw)
    data = load_data(str(folder), tok)
    with pytest.raises(ValueError, match=r"eval\.bin: sha256"):
        data.eval_batches(2, 16, 1)


def test_wrong_tokenizer_missing_and_bad_manifest(tok, docs, out1, tmp_path):
    other = train_bpe_tokenizer([d.decode() for d in docs[:5]], 300, tmp_path / "other.json")
    with pytest.raises(ValueError, match=f"sha256:{tok.sha256}.*sha256:{other.sha256}"):
        load_data(str(out1), other)
    with pytest.raises(ValueError, match="byte tokenizer"):
        load_data(str(out1), ByteTokenizer())
    folder = tmp_path / "copy"
    shutil.copytree(out1, folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(ValueError, match="no manifest.json.*did not finish"):
        load_data(str(folder), tok)
    with pytest.raises(ValueError, match="not a `shoal tokenize` folder"):
        TokenData.from_folder(folder, tok)
    (folder / MANIFEST).write_text("{broken")
    with pytest.raises(ValueError, match="not a valid shoal token manifest"):
        load_data(str(folder), tok)
    manifest = json.loads((out1 / MANIFEST).read_text())
    manifest["shards"][0]["name"] = "../escape.bin"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a plain name"):
        load_data(str(folder), tok)


def test_jsonl_and_parquet_inputs_tokenize_like_files(tok, docs, out1, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    texts = [d.decode() for d in docs]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(
        pa.table({"text": texts, "n": list(range(len(texts)))}), tmp_path / "docs.parquet"
    )
    assert load_corpus(str(tmp_path / "docs.parquet")) == docs
    for name in ("docs.jsonl", "docs.parquet"):
        out = tmp_path / f"out-{name}"
        tokenize_corpus(tok.path, str(tmp_path / name), out, shard_tokens=SHARD_TOKENS)
        assert all(np.array_equal(a, b) for a, b in zip(read_ids(out), read_ids(out1), strict=True))


def test_parquet_errors(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "no_text.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        load_corpus(str(tmp_path / "no_text.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="holds int64, not strings"):
        load_corpus(str(tmp_path / "ints.parquet"))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were missing
    with pytest.raises(ValueError, match="pip install pyarrow"):
        load_corpus(str(tmp_path / "no_text.parquet"))


def test_load_data_dispatch(tok, docs, corpus_dir, out1):
    as_bytes = load_data(str(corpus_dir), ByteTokenizer(), num_shards=4)
    assert isinstance(as_bytes, ByteData) and as_bytes.vocab_size == 256
    assert as_bytes.fingerprint() == ByteData(docs, num_shards=4).fingerprint()
    assert as_bytes.manifest_sha256 is None
    in_memory = load_data(str(corpus_dir), tok, num_shards=4)
    assert isinstance(in_memory, TokenData) and in_memory.manifest_sha256 is None
    from_folder = load_data(str(out1), tok, num_shards=4)
    assert isinstance(from_folder, TokenData) and from_folder.manifest_sha256 is not None
    assert in_memory.fingerprint() == from_folder.fingerprint()
    assert load_data(str(out1 / MANIFEST), tok).manifest_sha256 == from_folder.manifest_sha256
