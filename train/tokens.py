"""Tokenized data: the byte corpus's split and shards, over a real tokenizer's ids.

Two ways in, one result. A `shoal tokenize` folder (manifest.json plus flat shard files,
written by `shoal.train.tokenize_cmd`) is memory-mapped, so a corpus far bigger than RAM
trains without loading; plain text with a tokenizer.json is tokenized in memory at start-up,
which suits a few hundred MB. Both go through the same `split_pieces` as ByteData and join
pieces with the tokenizer's EOS id in the same order, so the same text gives the same
token streams, the same shards and the same batches either way.

Shard files are checked against the manifest in two steps. At load, cheaply: every file
exists and has exactly the manifest's size. Lazily, fully: the first `train_batches` reads
(sha256 and the largest id) only the files under this peer's shard, and `eval_batches`
the eval file; a peer on one shard of sixteen hashes a sixteenth of the corpus, not all of
it, and still finds a corrupted or swapped file before it trains on it. `verify()` checks
everything now.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.train.data import ByteData, load_corpus, split_pieces
from shoal.train.stream import Batch, TokenStream, WindowData, shard_for
from shoal.train.tokenizer import ByteTokenizer, Tokenizer

MANIFEST = "manifest.json"
FORMAT = "shoal-tokens"
FORMAT_VERSION = 1
EVAL_FILE = "eval.bin"
VERIFY_CHUNK = 1 << 24  # ids hashed per step when checking a shard file
ENCODE_BATCH = 256  # pieces per encode_batch call


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 while every id fits, else uint32: half the disk and page cache
    for vocabularies up to 65,536, which covers most (Llama 3's 128k does not)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[bytes], dtype: np.dtype) -> np.ndarray:
    """Ids of the pieces, each decoded as UTF-8 (a character cut at a piece boundary
    becomes U+FFFD), joined by the tokenizer's EOS id."""
    parts: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    for i in range(0, len(pieces), ENCODE_BATCH):
        texts = [p.decode("utf-8", errors="replace") for p in pieces[i : i + ENCODE_BATCH]]
        for ids in tokenizer.encode_batch(texts):
            if parts:
                parts.append(eos)
            parts.append(np.array(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardFile:
    """One file of a tokenized folder, as the manifest describes it."""

    name: str
    path: Path
    tokens: int
    sha256: str
    start: int = 0  # offset of its first id in the train stream
    array: np.ndarray | None = None
    verified: bool = False


def _shard_file(folder: Path, entry: dict[str, Any]) -> ShardFile:
    name = entry["name"]
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"file name {name!r} is not a plain name inside the folder")
    return ShardFile(name, folder / name, int(entry["tokens"]), str(entry["sha256"]))


def _memmap(path: Path, dtype: np.dtype, tokens: int) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path} is missing (listed in {MANIFEST})")
    size = path.stat().st_size
    if size != tokens * dtype.itemsize:
        raise ValueError(
            f"{path} holds {size} bytes, but {MANIFEST} lists {tokens} {dtype.name} ids "
            f"({tokens * dtype.itemsize} bytes): the file is truncated or from another run"
        )
    if tokens == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def read_manifest(folder: Path) -> tuple[dict[str, Any], bytes]:
    """(the manifest, its raw bytes), with a clear error for anything not a manifest."""
    path = folder / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{folder} holds no {MANIFEST}: not a `shoal tokenize` folder") from None
    try:
        manifest = json.loads(raw)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"version {manifest.get('version')!r}; this shoal reads 1")
        for key in ("tokenizer", "dtype", "shards", "eval"):
            if key not in manifest:
                raise ValueError(f"no {key!r} field")
        if manifest["dtype"] not in ("uint8", "uint16", "uint32"):
            raise ValueError(f"dtype {manifest['dtype']!r} is not uint8/uint16/uint32")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a valid shoal token manifest: {exc}") from None
    return manifest, raw


class TokenData(WindowData):
    """Train/eval token streams of a tokenized corpus, with ByteData's shards and batches.

    Build with `from_folder` (a `shoal tokenize` output, memory-mapped) or
    `from_documents` (text and a tokenizer, in memory). `vocab_size` is the tokenizer's:
    the model's embedding must have at least that many rows."""

    def __init__(
        self,
        train: TokenStream,
        eval_: TokenStream,
        *,
        num_shards: int,
        vocab_size: int,
        eos_id: int,
        eval_sha256: str,
        manifest_sha256: str | None = None,
        files: Sequence[ShardFile] = (),
        eval_file: ShardFile | None = None,
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        self.train_stream, self.eval_stream = train, eval_
        self.num_shards, self.vocab_size, self.eos_id = num_shards, vocab_size, eos_id
        self.eval_sha256 = eval_sha256
        self.manifest_sha256 = manifest_sha256
        self.files, self.eval_file = list(files), eval_file
        self._cut_shards()

    @classmethod
    def from_documents(
        cls,
        documents: list[bytes],
        tokenizer: Tokenizer,
        num_shards: int = 16,
        eval_fraction: float = 0.03,
    ) -> TokenData:
        """Split as ByteData does, then tokenize each side (uses the tokenizer's threads)."""
        eval_pieces, train_pieces = split_pieces(documents, eval_fraction)
        dtype = token_dtype(tokenizer.vocab_size)
        eval_ids = encode_pieces(tokenizer, eval_pieces, dtype)
        train_ids = encode_pieces(tokenizer, train_pieces, dtype)
        return cls(
            TokenStream([train_ids]),
            TokenStream([eval_ids]),
            num_shards=num_shards,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
            eval_sha256=hashlib.sha256(eval_ids.tobytes()).hexdigest(),
        )

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], tokenizer: Tokenizer | None, num_shards: int = 16
    ) -> TokenData:
        """Memory-map a `shoal tokenize` folder. With a tokenizer, its sha256 must be the
        manifest's. The split was fixed when the folder was written (its eval_fraction)."""
        folder = Path(folder)
        manifest, raw = read_manifest(folder)
        try:
            made_with = manifest["tokenizer"]["sha256"]
            vocab_size = int(manifest["tokenizer"]["vocab_size"])
            eos_id = int(manifest["tokenizer"]["eos_id"])
            dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
            files = [_shard_file(folder, s) for s in manifest["shards"]]
            eval_file = _shard_file(folder, manifest["eval"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{folder / MANIFEST} is not a valid shoal token manifest: {exc!r}"
            ) from None
        if tokenizer is not None and tokenizer.sha256 != made_with:
            given = (
                "the byte tokenizer"
                if tokenizer.sha256 is None
                else f"{tokenizer.name} (sha256:{tokenizer.sha256})"
            )
            raise ValueError(
                f"{folder} was tokenized with the tokenizer sha256:{made_with}, but the given "
                f"tokenizer is {given}: pass that tokenizer.json (--tokenizer), or tokenize "
                "the text again with this one"
            )
        start = 0
        for f in [*files, eval_file]:
            f.array = _memmap(f.path, dtype, f.tokens)
        for f in files:
            f.start, start = start, start + f.tokens
        assert eval_file.array is not None
        return cls(
            TokenStream([f.array for f in files if f.array is not None]),
            TokenStream([eval_file.array]),
            num_shards=num_shards,
            vocab_size=vocab_size,
            eos_id=eos_id,
            eval_sha256=eval_file.sha256,
            manifest_sha256=hashlib.sha256(raw).hexdigest(),
            files=files,
            eval_file=eval_file,
        )

    def fingerprint(self) -> str:
        """sha256 of the eval ids' hash and the shard sizes: equal on two peers iff they
        hold the same held-out tokens and cut the training tokens the same way, whether
        their data came from a folder or from text (no file is read for it)."""
        digest = hashlib.sha256(b"shoal-tokens:" + self.eval_sha256.encode())
        sizes = [b - a for a, b in self.shard_ranges]
        digest.update(np.array(sizes, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def peer_shard(self, peer_id: str) -> TokenStream:
        return self.peer_stream(peer_id)

    def _verify(self, f: ShardFile) -> None:
        if f.verified or f.array is None:
            return
        digest, top = hashlib.sha256(), -1
        for i in range(0, len(f.array), VERIFY_CHUNK):
            chunk = np.asarray(f.array[i : i + VERIFY_CHUNK])
            digest.update(memoryview(chunk).cast("B"))
            top = max(top, int(chunk.max()))
        if digest.hexdigest() != f.sha256:
            raise ValueError(
                f"{f.path}: sha256 {digest.hexdigest()} differs from the manifest's {f.sha256}: "
                "the file is corrupt or from another tokenize run; run `shoal tokenize` again"
            )
        if top >= self.vocab_size:
            raise ValueError(f"{f.path} holds id {top}, outside the vocabulary ({self.vocab_size})")
        f.verified = True

    def verify(self) -> None:
        """Check every file's sha256 now (a folder's; text data has nothing to check)."""
        for f in [*self.files, *([self.eval_file] if self.eval_file else [])]:
            self._verify(f)

    def train_batches(
        self, peer_id: str, batch_size: int, seq_len: int, seed: int
    ) -> Iterator[Batch]:
        lo, hi = self.shard_ranges[shard_for(peer_id, self.num_shards)]
        for f in self.files:
            if f.start < hi and lo < f.start + f.tokens:
                self._verify(f)
        return super().train_batches(peer_id, batch_size, seq_len, seed)

    def eval_batches(self, batch_size: int, seq_len: int, num_batches: int) -> list[Batch]:
        if self.eval_file is not None:
            self._verify(self.eval_file)
        return super().eval_batches(batch_size, seq_len, num_batches)


def load_data(
    path: str | None, tokenizer: Tokenizer, num_shards: int = 16, eval_fraction: float = 0.03
) -> ByteData | TokenData:
    """What a peer trains on. A folder holding manifest.json: its token shards (the
    tokenizer must be the one that made them). Otherwise text (`load_corpus`): ByteData for
    the byte tokenizer, exactly as before tokenizers existed, or TokenData tokenized now."""
    if path is not None and Path(path).name == MANIFEST and Path(path).is_file():
        path = str(Path(path).parent)  # the manifest named instead of its folder
    if path is not None and Path(path).is_dir():
        folder = Path(path)
        if (folder / MANIFEST).is_file():
            return TokenData.from_folder(folder, tokenizer, num_shards)
        leftovers = sorted(
            p.name for p in folder.glob("*.bin") if p.name.startswith(("train-", "eval"))
        )
        if leftovers:
            raise ValueError(
                f"{folder} holds token shards ({', '.join(leftovers[:3])}"
                f"{', ...' if len(leftovers) > 3 else ''}) but no {MANIFEST}; it is written "
                "last, so the `shoal tokenize` run that made them did not finish: run it again"
            )
    documents = load_corpus(path)
    if isinstance(tokenizer, ByteTokenizer):
        return ByteData(documents, num_shards, eval_fraction)
    return TokenData.from_documents(documents, tokenizer, num_shards, eval_fraction)
