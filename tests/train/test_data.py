import json
import logging
import random

import pytest
import torch

from shoal.train import DOC_SEPARATOR, ByteData, DataConfig, load_corpus, shard_for
from shoal.train.data import SNIFF_BYTES, looks_like_text


def make_docs(count: int = 200, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "value", "for", "in", "if", "else"]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(20, 200))).encode()
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def data() -> ByteData:
    return ByteData(make_docs(), num_shards=4)


@pytest.fixture(scope="module")
def stdlib_docs() -> list[bytes]:
    return load_corpus(None)


# ---- loading ------------------------------------------------------------------------


def test_load_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("héllo world\n".encode())
    assert load_corpus(str(path)) == ["héllo world\n".encode()]


def test_load_jsonl_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "first doc", "id": 1}, {"text": "second"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_corpus(str(path)) == [b"first doc", b"second"]


def test_jsonl_without_text_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_corpus(str(path))


def test_load_folder_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / "c.jsonl").write_text('{"text": "see"}\n')
    (tmp_path / "skip.bin").write_bytes(b"\x01\x02")
    assert load_corpus(str(tmp_path)) == [b"bee", b"see", b"ay"]


def test_folder_reads_text_without_a_suffix_and_skips_binaries(tmp_path, caplog):
    readme = "plain text without a suffix, ünïcode included\n".encode()
    (tmp_path / "README").write_bytes(readme)
    (tmp_path / "notes.rst").write_text("other suffix")
    (tmp_path / "blob").write_bytes(bytes(range(256)))  # NUL and control bytes
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "latin1").write_bytes("café".encode("latin-1"))  # not UTF-8
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")  # text, but not corpus
    with caplog.at_level(logging.WARNING, logger="shoal.train.data"):
        assert load_corpus(str(tmp_path)) == [readme, b"other suffix"]
    assert "skipped 3 binary" in caplog.text
    assert all(name in caplog.text for name in ("blob", "image.png", "latin1"))


def test_folder_of_binaries_only_is_refused_naming_them(tmp_path):
    (tmp_path / "weights").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="holds no text files.*skipped 1 binary: weights"):
        load_corpus(str(tmp_path))


def test_text_sniff_allows_a_character_cut_by_the_limit(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(b"a" * (SNIFF_BYTES - 1) + "é".encode())  # é's second byte past the limit
    assert looks_like_text(path)
    path.write_bytes(b"a" * (SNIFF_BYTES - 1) + b"\xff\xfe")
    assert not looks_like_text(path)
    path.write_bytes(b"")
    assert looks_like_text(path)


def test_load_glob(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name)
    assert load_corpus(str(tmp_path / "x*.txt")) == [b"x1.txt", b"x2.txt"]


def test_missing_and_empty_inputs_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="nope.txt"):
        load_corpus(missing)
    with pytest.raises(ValueError, match="matches no files"):
        load_corpus(str(tmp_path / "*.none"))
    with pytest.raises(ValueError, match="holds no"):
        load_corpus(str(tmp_path))  # empty folder
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        load_corpus(str(tmp_path / "empty.txt"))


def test_default_corpus_is_stdlib_and_deterministic(stdlib_docs):
    again = load_corpus(None)
    assert again == stdlib_docs
    total = sum(len(d) for d in stdlib_docs)
    assert 1_000_000 < total < 9_000_000
    assert any(b"def " in d for d in stdlib_docs[:20])


# ---- split, shards, batches ---------------------------------------------------------


def test_eval_split_disjoint_and_reproducible(stdlib_docs):
    a, b = ByteData(stdlib_docs), ByteData(list(stdlib_docs))
    assert a.fingerprint() == b.fingerprint()
    assert torch.equal(torch.from_numpy(a.eval_bytes.copy()), torch.from_numpy(b.eval_bytes.copy()))
    assert 0.01 < len(a.eval_bytes) / (len(a.eval_bytes) + len(a.train_bytes)) < 0.06
    # no eval document is in the training bytes
    train = a.train_bytes.tobytes()
    eval_docs = [d for d in a.eval_bytes.tobytes().split(DOC_SEPARATOR) if len(d) > 200]
    assert eval_docs and not any(d in train for d in eval_docs[:20])
    assert all(
        torch.equal(p[0], q[0])
        for p, q in zip(a.eval_batches(4, 32, 3), b.eval_batches(4, 32, 3), strict=True)
    )


def test_small_corpus_still_gets_an_eval_split():
    data = ByteData(make_docs(count=3))  # ~2 KB: pieces shrink so both sides get some
    assert len(data.eval_bytes) > 0 and len(data.train_bytes) > 0
    with pytest.raises(ValueError, match="too small"):
        ByteData([b"only one"])
    with pytest.raises(ValueError, match="empty"):
        ByteData([])


def test_shard_for_stable_and_spread():
    assert shard_for("peer-0", 16) == shard_for("peer-0", 16) == ByteData.shard_for("peer-0", 16)
    shards = {shard_for(f"peer-{i}", 16) for i in range(50)}
    assert len(shards) > 10 and all(0 <= s < 16 for s in shards)
    assert len({shard_for(f"peer-{i}", 16) for i in range(3)}) == 3  # the demo's peers differ


def test_shards_partition_training_bytes(data):
    assert len(data.shards) == 4
    assert b"".join(s.tobytes() for s in data.shards) == data.train_bytes.tobytes()


def test_train_batches_shapes_shift_and_shard(data):
    batches = data.train_batches("peer-1", batch_size=3, seq_len=16, seed=0)
    shard = data.peer_shard("peer-1").tobytes()
    for _ in range(5):
        x, y = next(batches)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in range(3):
            window = bytes(x[row].tolist()) + bytes([y[row, -1].item()])
            assert window in shard


def test_train_batches_deterministic_per_peer_and_seed(data):
    def first(peer, seed):
        return next(data.train_batches(peer, 4, 8, seed=seed))[0]

    assert torch.equal(first("peer-0", 0), first("peer-0", 0))
    assert not torch.equal(first("peer-0", 0), first("peer-0", 1))


def test_different_peers_train_on_different_bytes(data):
    by_shard = {shard_for(f"peer-{i}", 4): f"peer-{i}" for i in range(8)}
    assert len(by_shard) > 1  # eight ids do not all hash to one shard of four
    first, second = list(by_shard.values())[:2]
    assert data.peer_shard(first).tobytes() != data.peer_shard(second).tobytes()


def test_eval_batches_fixed_and_cover_eval_bytes(data):
    batches = data.eval_batches(batch_size=2, seq_len=8, num_batches=5)
    assert len(batches) == 5 and all(
        x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches
    )
    assert batches[0][0][0].tolist() == list(data.eval_bytes[:8])
    last_x, last_y = batches[-1]
    assert last_y[-1, -1].item() == data.eval_bytes[-1]


def test_too_long_windows_are_refused(data):
    with pytest.raises(ValueError, match="seq_len"):
        next(data.train_batches("peer-0", 1, len(data.train_bytes), seed=0))
    with pytest.raises(ValueError, match="seq_len"):
        data.eval_batches(1, len(data.eval_bytes), 1)


def test_data_config_validation():
    assert DataConfig().num_shards == 16
    with pytest.raises(ValueError, match="num-shards"):
        DataConfig(num_shards=0)
