"""Tokenizers: the byte vocabulary shoal started with, and Hugging Face `tokenizer.json` files.

A run names its tokenizer by the sha256 of the tokenizer.json bytes (`RunConfig.tokenizer`),
so two peers agree on the vocabulary without shipping it in every message; the byte
tokenizer has no file and no hash. Data code needs only three things of a tokenizer: its
vocabulary size (the model's embedding must be at least that big), the id that separates
documents (EOS), and a batch encoder that adds no special tokens of its own (shoal puts the
separators itself, so a BOS/EOS post-processor in the file must not double them).
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BYTES = "bytes"
# Names of a document separator in common tokenizer.json files, the pretraining one first:
# Llama 3 holds both <|end_of_text|> (between documents) and <|eot_id|> (end of a chat turn).
EOS_NAMES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|eos|>",
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
)


class Tokenizer(ABC):
    """What shoal's data code asks of a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int
    sha256: str | None  # of the tokenizer.json bytes; None for the byte tokenizer
    path: str | None

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]


class ByteTokenizer(Tokenizer):
    """The 256 byte values; id 0 (NUL, DOC_SEPARATOR) ends a document, as in ByteData."""

    name = BYTES
    vocab_size = 256
    eos_id = 0
    sha256 = None
    path = None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, read through the `tokenizers` package.

    The file is read once: its bytes are both hashed and parsed, so `sha256` is the hash
    of exactly what is loaded. Truncation and padding settings in the file are switched
    off; a training piece of 64 KiB must not come back cut at 512 tokens. Special tokens
    spelled out in the text are encoded as plain text (where the library can), so a
    document quoting "<|endoftext|>" does not get a document break in its middle."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = str(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read tokenizer {self.path}: {exc.strerror or exc}") from None
        try:
            self._tokenizer = RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{self.path} is not a Hugging Face tokenizer.json ({exc})") from None
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        if hasattr(self._tokenizer, "encode_special_tokens"):  # tokenizers >= 0.19
            # text that spells "<|endoftext|>" is text: EOS comes only where shoal puts it
            self._tokenizer.encode_special_tokens = True
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.name = self.path
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()
        # encode_batch_fast (tokenizers >= 0.21) skips offsets, which shoal never uses
        self._encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)

    def _find_eos(self) -> int:
        """The document separator: the first of EOS_NAMES among the added (special) tokens,
        else in the model's vocabulary."""
        added = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items()}
        for name in EOS_NAMES:
            if name in added:
                return added[name]
        for name in EOS_NAMES:
            found = self._tokenizer.token_to_id(name)
            if found is not None:
                return found
        raise ValueError(
            f"tokenizer {self.path} has no end-of-document token (looked for "
            f"{', '.join(EOS_NAMES)}); shoal separates documents with one: add it as a "
            "special token (tokenizer.add_special_tokens(['<|endoftext|>']); tokenizer.save)"
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(spec: str | os.PathLike[str] | None) -> Tokenizer:
    """None or "bytes": the byte tokenizer. Otherwise a tokenizer.json, or a folder (a
    Hugging Face checkpoint) that holds one."""
    if spec is None or spec == BYTES:
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"tokenizer folder {str(spec)!r} holds no tokenizer.json")
        path = path / "tokenizer.json"
    elif not path.exists():
        raise ValueError(f"tokenizer {str(spec)!r} does not exist (expected a tokenizer.json)")
    return HFTokenizer(path)


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, path: str | os.PathLike[str]
) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style: every byte has a token, so any text
    encodes) with one special token, "<|endoftext|>", the document separator; save it to
    `path` and load it back. Small vocabularies train in a second or two: this is for tests,
    examples and small experiments, not a replacement for a production tokenizer."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    byte_level: Any = pre_tokenizers.ByteLevel
    if vocab_size < len(byte_level.alphabet()) + 1:
        raise ValueError(f"vocab_size must be at least 257 (256 bytes + EOS), got {vocab_size}")
    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = byte_level(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=byte_level.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, target)
    return HFTokenizer(target)
