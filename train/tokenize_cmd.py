"""`shoal tokenize`: turn a text corpus into a folder of token shards, once, ahead of training.

Tokenizing at every peer start costs minutes for a few GB of text and needs the corpus in
RAM; a tokenized folder is memory-mapped in milliseconds (`TokenData.from_folder`). The
output is exactly what `TokenData.from_documents` would build in memory from the same text
and tokenizer: the same `split_pieces`, the same EOS between pieces, the same order. The
train stream is only cut into files of `--shard-tokens` ids for the file system's sake;
the peers' logical shards are cut afterwards, at load, by `--num-shards`.

Nothing in the folder depends on `--workers` or on time: results come back in order, the
manifest holds no timestamp, so two runs over the same text give byte-identical folders
(and the same manifest sha256, which a run's definition shows). Each file is written to a
temporary name and renamed into place; the manifest is removed first and written last, so a
folder with a manifest is always complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from shoal.train.data import DEFAULT_CORPUS_BYTES, load_corpus, split_pieces
from shoal.train.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from shoal.train.tokens import (
    EVAL_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    encode_pieces,
    token_dtype,
)

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 file
CHUNK_BYTES = 1 << 20  # text per task handed to a worker: big enough to amortise the hand-off

_worker_tokenizer: Tokenizer | None = None  # one per worker process, loaded by _init_worker


def add_tokenize_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `tokenize` subcommand to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "tokenize",
        help="tokenize a text corpus into shard files that peers memory-map (--data DIR)",
        description="Tokenize a text corpus once, ahead of training, into a folder of token "
        "shard files and a manifest.json; peers train on it with --data DIR and the same "
        "--tokenizer. The output does not depend on --workers.",
    )
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help="a tokenizer.json")
    parser.add_argument(
        "--data",
        default=None,
        metavar="SRC",
        help="text file, folder or glob (.jsonl/.parquet: the text field); "
        "default: this Python's standard library sources",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="tokenizing processes (default 1: this one, on the tokenizer library's threads)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help=f"ids per train shard file (default {DEFAULT_SHARD_TOKENS:,})",
    )
    parser.add_argument(
        "--eval-fraction",
        type=float,
        default=0.03,
        help="share of the text held out for evaluation (default 0.03)",
    )
    return parser


def tokenize_main(args: argparse.Namespace) -> int:
    """Run `shoal tokenize` with parsed arguments; 0 on success, 2 on a usage error."""
    try:
        manifest, seconds = tokenize_corpus(
            args.tokenizer,
            args.data,
            args.out,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            eval_fraction=args.eval_fraction,
            progress=True,
        )
    except (ValueError, OSError) as exc:
        print(f"shoal tokenize: error: {exc}", file=sys.stderr)
        return 2
    tokens = sum(s["tokens"] for s in manifest["shards"]) + manifest["eval"]["tokens"]
    text_mb = manifest["text_bytes"] / 1e6
    print(
        f"wrote {args.out}: {tokens:,} tokens ({len(manifest['shards'])} train shard files, "
        f"{manifest['eval']['tokens']:,} eval) from {text_mb:.1f} MB of text in {seconds:.1f} s: "
        f"{text_mb / max(seconds, 1e-9):.2f} MB/s",
        file=sys.stderr,
    )
    return 0


def _init_worker(tokenizer_path: str, single_threaded: bool) -> None:
    global _worker_tokenizer
    if single_threaded:  # N worker processes each using every core would fight for them
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_chunk(task: tuple[Sequence[bytes], str]) -> np.ndarray:
    pieces, dtype = task
    assert _worker_tokenizer is not None, "_init_worker has not run"
    return encode_pieces(_worker_tokenizer, pieces, np.dtype(dtype))


def _chunks(pieces: list[bytes], dtype: str) -> Iterator[tuple[list[bytes], str]]:
    """Consecutive runs of pieces holding about CHUNK_BYTES of text each."""
    start, size = 0, 0
    for i, piece in enumerate(pieces):
        size += len(piece)
        if size >= CHUNK_BYTES:
            yield pieces[start : i + 1], dtype
            start, size = i + 1, 0
    if start < len(pieces):
        yield pieces[start:], dtype


class _ShardWriter:
    """Appends ids to files of at most `limit` ids each (`name(i)` names file i), each
    written under a temporary name and renamed when full or at `close`."""

    def __init__(self, folder: Path, name: Any, limit: int, dtype: np.dtype) -> None:
        self.folder, self.name, self.limit, self.dtype = folder, name, limit, dtype
        self.done: list[dict[str, Any]] = []
        self._file: Any = None

    def _open(self) -> None:
        self._path = self.folder / self.name(len(self.done))
        self._tmp = self._path.with_name(f".{self._path.name}.tmp")
        self._file, self._digest, self._count = self._tmp.open("wb"), hashlib.sha256(), 0

    def _finish(self) -> None:
        self._file.close()
        os.replace(self._tmp, self._path)
        entry = {"name": self._path.name, "tokens": self._count}
        self.done.append(entry | {"sha256": self._digest.hexdigest()})
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None:
                self._open()
            take = ids[: self.limit - self._count]
            data = take.tobytes()
            self._file.write(data)
            self._digest.update(data)
            self._count += len(take)
            ids = ids[len(take) :]
            if self._count == self.limit:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._file is None and not self.done:
            self._open()  # an empty stream still gets its (empty) file
        if self._file is not None:
            self._finish()
        return self.done


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def tokenize_corpus(
    tokenizer_path: str,
    data: str | None,
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    eval_fraction: float = 0.03,
    progress: bool = False,
) -> tuple[dict[str, Any], float]:
    """Tokenize `data` into `out`; (the manifest written, seconds spent tokenizing and
    writing). With workers=1 the tokenizer runs in this process, on as many threads as
    the tokenizers library picks (RAYON_NUM_THREADS=1 holds it to one core)."""
    if workers < 1 or shard_tokens < 1:
        raise ValueError("--workers and --shard-tokens must be >= 1")
    tokenizer = load_tokenizer(tokenizer_path)
    if isinstance(tokenizer, ByteTokenizer):
        raise ValueError("byte-level data needs no tokenizing: pass the text to --data directly")
    dtype = token_dtype(tokenizer.vocab_size)
    eval_pieces, train_pieces = split_pieces(load_corpus(data), eval_fraction)
    text_bytes = sum(map(len, eval_pieces)) + sum(map(len, train_pieces))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # the old one would describe files we replace

    from tqdm import tqdm

    started = time.perf_counter()
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    train = _ShardWriter(folder, lambda i: f"train-{i:05d}.bin", shard_tokens, dtype)
    evals = _ShardWriter(folder, lambda i: EVAL_FILE, sys.maxsize, dtype)
    tasks = [(evals, t) for t in _chunks(eval_pieces, dtype.str)]
    tasks += [(train, t) for t in _chunks(train_pieces, dtype.str)]
    bar = tqdm(
        total=text_bytes,
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=None if progress else True,
    )
    with bar, _mapper(tokenizer_path, workers) as mapper:
        results = mapper(_encode_chunk, [t for _, t in tasks])
        seen: set[int] = set()
        for (writer, (pieces, _)), ids in zip(tasks, results, strict=True):
            if id(writer) in seen:
                writer.write(eos)  # between the last piece of one chunk and the next's first
            seen.add(id(writer))
            writer.write(ids)
            bar.update(sum(map(len, pieces)))
    shards, eval_entry = train.close(), evals.close()[0]
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": {
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
        },
        "dtype": dtype.name,
        "shards": shards,
        "eval": eval_entry,
        "eval_fraction": eval_fraction,
        "source": data if data is not None else _stdlib_source(),
        "text_bytes": text_bytes,
    }
    _write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    listed = {s["name"] for s in shards}
    for stale in folder.glob("train-*.bin"):  # left by an earlier run with more shards
        if stale.name not in listed:
            stale.unlink()
    return manifest, time.perf_counter() - started


def _stdlib_source() -> str:
    return (
        f"python {sys.version_info.major}.{sys.version_info.minor} standard library sources "
        f"(first {DEFAULT_CORPUS_BYTES // 2**20} MiB)"
    )


@contextmanager
def _mapper(tokenizer_path: str, workers: int) -> Iterator[Any]:
    """An ordered map over tasks: in this process for one worker, else a process pool
    whose workers each load the tokenizer once. Fork where the platform has it (no
    re-import of torch per worker), spawn elsewhere."""
    global _worker_tokenizer
    if workers == 1:
        _init_worker(tokenizer_path, single_threaded=False)
        try:
            yield map
        finally:
            _worker_tokenizer = None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, True))
    try:
        yield lambda fn, tasks: pool.imap(fn, tasks, chunksize=1)
    finally:
        pool.terminate()
        pool.join()
