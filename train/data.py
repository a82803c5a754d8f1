"""Byte-level data: a corpus of documents, a held-out eval split, and one shard per peer.

Every peer of a run must agree on two things without talking: which bytes are held out
for evaluation (so eval losses are comparable across peers), and which shard of the
training bytes it trains on (so replicas see different data, as in DiLoCo). Both are
decided by sha256 of content or of the peer id, never by Python's salted `hash()` or by
file-system order, so they come out the same on every machine with the same corpus.

    documents ─► pieces (≤ 64 KiB) ─► sha256 score ─► eval pieces | train pieces
    train pieces joined by DOC_SEPARATOR ─► cut into num_shards contiguous shards
    peer_id ─► sha256 ─► shard index ─► random windows (x, y = x shifted by one byte)

The piece split (`split_pieces`) is shared with tokenized data (`shoal.train.tokens`): a
tokenizer sees the same eval and train pieces, so the held-out text is the same whichever
vocabulary a run uses. Shards and windows live in `shoal.train.stream`, shared too.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoal.train.stream import Batch as Batch  # re-exported: callers import it from here
from shoal.train.stream import TokenStream, WindowData, shard_bounds
from shoal.train.stream import shard_for as shard_for

DOC_SEPARATOR = b"\x00"  # between documents: an end-of-document byte that source text never holds
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".parquet")  # read from a folder without a look
SNIFF_BYTES = 8192  # read of a folder's other files to tell UTF-8 text from binary
# C0 control bytes that plain text does not hold (tab, LF, VT, FF and CR it does); NUL among
# them, so a sniffed file cannot carry DOC_SEPARATOR at its start
_BINARY_BYTES = bytes(sorted(set(range(32)) - set(b"\t\n\v\f\r")))
DEFAULT_CORPUS_BYTES = 8 * 1024 * 1024  # the stdlib corpus stops at this size (loads in ~0.1 s)
MAX_PIECE_BYTES = 64 * 1024  # long documents are split so that one big file cannot fill eval

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    """Where the bytes come from and how they are served; every peer of a run shares it."""

    path: str | None = None  # a file, folder or glob (`load_corpus`); None: the stdlib sources
    num_shards: int = 16
    batch_size: int = 16
    seq_len: int = 128
    eval_batches: int = 8
    eval_fraction: float = 0.03

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"--num-shards must be >= 1, got {self.num_shards}")
        if self.batch_size < 1 or self.seq_len < 1 or self.eval_batches < 1:
            raise ValueError("--batch-size, --seq-len and --eval-batches must be >= 1")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


# ---- loading ------------------------------------------------------------------------


def stdlib_source_files() -> list[Path]:
    """The running interpreter's standard-library `.py` files in sorted relative-path
    order, leaving out site-packages (installed, differs per machine) and test folders
    (huge, and full of deliberately odd data)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[bytes]:
    documents, total = [], 0
    for path in stdlib_source_files():
        if total >= max_bytes:
            break
        data = path.read_bytes()
        if data:
            documents.append(data)
            total += len(data)
    if not documents:
        raise ValueError(
            f"no .py files found under the standard library at {sysconfig.get_paths()['stdlib']}"
        )
    return documents


def looks_like_text(path: Path, sniff_bytes: int = SNIFF_BYTES) -> bool:
    """Whether the file's first `sniff_bytes` bytes are UTF-8 text: they decode (a character
    cut by the limit allowed) and hold no NUL or other control byte but tab, newline, VT,
    FF and CR. An empty file counts as text (it adds no document)."""
    with path.open("rb") as stream:
        head = stream.read(sniff_bytes)
    if head.translate(None, _BINARY_BYTES) != head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < sniff_bytes)
    except UnicodeDecodeError:
        return False
    return True


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(files to read, files skipped as binary) under `folder`, recursively, sorted: every
    file with a TEXT_SUFFIXES suffix, and any other that `looks_like_text` outside hidden
    files and folders (a checkout's .git holds text that is not corpus)."""
    files, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix in TEXT_SUFFIXES:
            files.append(path)
        elif any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        elif looks_like_text(path):
            files.append(path)
        else:
            skipped.append(path)
    return files, skipped


def _read_jsonl(path: Path) -> list[bytes]:
    documents = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}:{lineno}: expected a JSON object with a 'text' field ({exc})"
            ) from None
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: 'text' must be a string")
        documents.append(text.encode("utf-8"))
    return documents


def _read_parquet(path: Path) -> list[bytes]:
    """The `text` column, one document per row (null rows skipped). pyarrow is imported
    here, not at the top: only parquet input needs it, and it is not a core dependency."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading .parquet files needs pyarrow: pip install pyarrow"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        table = parquet.read(columns=["text"]) if "text" in names else None
    except Exception as exc:  # pyarrow's own errors: not a parquet file, or a damaged one
        raise ValueError(f"{path}: cannot read as parquet ({exc})") from None
    if table is None:
        raise ValueError(f"{path}: the parquet file has no 'text' column (it has {names})")
    column = table.column("text")
    if column.type not in ("string", "large_string"):
        raise ValueError(f"{path}: the 'text' column holds {column.type}, not strings")
    return [text.encode("utf-8") for text in column.to_pylist() if text is not None]


def _read_file(path: Path) -> list[bytes]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    return [path.read_bytes()]


def load_corpus(path: str | None) -> list[bytes]:
    """Documents as raw bytes. `None`: the standard library's own sources (first ~8 MB by
    sorted path): always present, no download, the same on every peer with the same
    Python. Otherwise a file, a folder or a glob; a `.jsonl` file gives one document per
    line, its "text" field, and a `.parquet` file one per row of its "text" column. A folder
    is read recursively: files ending in .txt/.md/.py/.jsonl/.parquet,
    and files with any other suffix or none that hold UTF-8 text (`looks_like_text` on
    their first SNIFF_BYTES); binary files are skipped, and logged."""
    if path is None:
        return _default_corpus()
    target = Path(path)
    if target.is_file():
        files = [target]
    elif target.is_dir():
        files, skipped = _folder_files(target)
        binaries = ", ".join(p.relative_to(target).as_posix() for p in skipped[:5])
        binaries += ", ..." if len(skipped) > 5 else ""
        if not files:
            raise ValueError(
                f"data folder {path!r} holds no text files ({'/'.join(TEXT_SUFFIXES)} or other "
                f"UTF-8 text)" + (f"; skipped {len(skipped)} binary: {binaries}" if skipped else "")
            )
        if skipped:
            logger.warning(
                "data folder %r: skipped %d binary file(s): %s", path, len(skipped), binaries
            )
    elif glob.has_magic(path):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise ValueError(f"data glob {path!r} matches no files")
    else:
        raise ValueError(f"data path {path!r} does not exist")
    documents = [doc for f in files for doc in _read_file(f) if doc]
    if not documents:
        raise ValueError(f"data path {path!r} holds no text (all files empty)")
    return documents


# ---- split, shards, batches ---------------------------------------------------------


def _stable_score(data: bytes) -> float:
    """A number in [0, 1) fixed by the content alone."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") / 2**64


def split_pieces(
    documents: Iterable[bytes], eval_fraction: float
) -> tuple[list[bytes], list[bytes]]:
    """(eval pieces, train pieces), each in corpus order.

    Each document is cut into pieces of at most MAX_PIECE_BYTES (smaller for small
    corpora, so there are ~100 pieces to choose from); a piece is eval when the sha256
    score of its content is below `eval_fraction` (at least one piece always is). Identical
    content always lands on the same side, so duplicates cannot leak; and the split is a
    property of the text alone, the same for bytes and for every tokenizer."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    documents = list(documents)
    total = sum(len(d) for d in documents)
    if total == 0:
        raise ValueError("the corpus is empty")
    piece_bytes = max(256, min(MAX_PIECE_BYTES, total // 100))
    pieces = [
        doc[i : i + piece_bytes] for doc in documents for i in range(0, len(doc), piece_bytes)
    ]
    scores = [_stable_score(p) for p in pieces]
    is_eval = [s < eval_fraction for s in scores]
    if not any(is_eval):
        is_eval[int(np.argmin(scores))] = True
    if all(is_eval):
        raise ValueError(f"corpus too small to split into train and eval ({total} bytes)")
    eval_pieces = [p for p, e in zip(pieces, is_eval, strict=True) if e]
    train_pieces = [p for p, e in zip(pieces, is_eval, strict=True) if not e]
    return eval_pieces, train_pieces


class ByteData(WindowData):
    """Train/eval split and per-peer shards of a byte corpus, the 256-id vocabulary.

    `split_pieces` decides eval and train; train pieces joined by DOC_SEPARATOR, in corpus
    order, form `train_bytes`, cut into `num_shards` contiguous `shards` (views of it).
    Both are one-array `TokenStream`s to the shared window code (`WindowData`)."""

    unit = "bytes"
    vocab_size = 256
    manifest_sha256 = None  # text data: no tokenized folder behind it

    def __init__(
        self, documents: list[bytes], num_shards: int = 16, eval_fraction: float = 0.03
    ) -> None:
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        eval_pieces, train_pieces = split_pieces(documents, eval_fraction)
        self.num_shards = num_shards
        self.eval_bytes = self._join(eval_pieces)
        self.train_bytes = self._join(train_pieces)
        self.eval_stream = TokenStream([self.eval_bytes])
        self.train_stream = TokenStream([self.train_bytes])
        self._cut_shards()
        bounds = shard_bounds(len(self.train_bytes), num_shards)
        self.shards = [self.train_bytes[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    @staticmethod
    def _join(pieces: list[bytes]) -> np.ndarray:
        return np.frombuffer(DOC_SEPARATOR.join(pieces), dtype=np.uint8)

    def fingerprint(self) -> str:
        """sha256 of the eval bytes and shard sizes: equal on two peers iff they split the
        same corpus the same way (cheap to compare when a peer joins)."""
        digest = hashlib.sha256(self.eval_bytes.tobytes())
        digest.update(np.array([len(s) for s in self.shards], dtype=np.int64).tobytes())
        return digest.hexdigest()

    def peer_shard(self, peer_id: str) -> np.ndarray:
        """This peer's training bytes: one contiguous view of `train_bytes`."""
        return self.shards[shard_for(peer_id, self.num_shards)]
