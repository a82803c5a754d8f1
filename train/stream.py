"""Token streams and the window/shard/batch logic that byte and token data share.

A training corpus, once split, is two long sequences of token ids: the training stream
and the held-out eval stream. Bytes are one small in-memory array; a tokenized corpus is
many shard files, memory-mapped, too big to concatenate. `TokenStream` hides the
difference: a logical sequence over one or more numpy arrays (np.memmap included) that
can be sliced without copying and read as a batch of windows, a window free to cross from
one array into the next.

`WindowData` is what `ByteData` and `TokenData` have in common, written once: the cut of
the training stream into `num_shards` contiguous shards, the peer → shard choice, the
random training windows and the fixed eval windows. Changing any of it changes the batches
every recorded benchmark was run on, so it reproduces the original byte-only code exactly:
the same RNG draws, the same start offsets, the same values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

SHARD_HASH_PREFIX = b"shoal-shard:"
TOKEN_DTYPES = (np.uint8, np.uint16, np.uint32)  # what a stream's arrays may hold

Batch = tuple[torch.Tensor, torch.Tensor]


def shard_for(peer_id: str, num_shards: int) -> int:
    """The shard a peer trains on: sha256 of its id, the same on every machine and run.
    The prefix separates this use of the id's hash from others (the batch RNG seed); as it
    happens, the demo's ids peer-0 … peer-4 land on five different shards of 16."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.sha256(SHARD_HASH_PREFIX + peer_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def shard_bounds(length: int, num_shards: int) -> np.ndarray:
    """num_shards + 1 offsets cutting `length` items into contiguous, near-equal shards."""
    return np.linspace(0, length, num_shards + 1).astype(np.int64)


class TokenStream:
    """One logical sequence of token ids over several 1-D arrays, in order.

    Nothing is copied: the arrays (views or memmaps) are kept as given and `slice` gives
    views of them, so a peer's shard of a 50 GB tokenized corpus costs no memory until its
    windows are read."""

    def __init__(self, pieces: Sequence[np.ndarray]) -> None:
        for piece in pieces:
            if piece.ndim != 1 or piece.dtype not in TOKEN_DTYPES:
                raise ValueError(
                    f"token arrays must be 1-D uint8/uint16/uint32, got {piece.dtype}{piece.shape}"
                )
        self.pieces = [p for p in pieces if len(p)]
        # offsets[i] is where pieces[i] starts; offsets[-1] the total length
        self.offsets = np.cumsum([0] + [len(p) for p in self.pieces], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def slice(self, start: int, stop: int) -> TokenStream:
        """Items [start, stop) as a new stream of views (no copy)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"slice [{start}, {stop}) outside a stream of {len(self)}")
        views = []
        for piece, begin in zip(self.pieces, self.offsets[:-1], strict=True):
            lo, hi = max(start - begin, 0), min(stop - begin, len(piece))
            if lo < hi:
                views.append(piece[lo:hi])
        return TokenStream(views)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Items [start, stop) as one array: a view when they lie in one piece, else a copy."""
        part = self.slice(start, stop).pieces
        if len(part) == 1:
            return part[0]
        return np.concatenate(part) if part else np.empty(0, dtype=np.uint8)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 array (len(starts), length): row i holds items starts[i] … starts[i]+length-1."""
        starts = np.asarray(starts, dtype=np.int64)
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            raise IndexError(f"a window of {length} outside a stream of {len(self)}")
        out = np.empty((len(starts), length), dtype=np.int64)
        index = np.searchsorted(self.offsets, starts, side="right") - 1
        for row, (start, i) in enumerate(zip(starts.tolist(), index.tolist(), strict=True)):
            lo = start - int(self.offsets[i])
            if lo + length <= len(self.pieces[i]):
                out[row] = self.pieces[i][lo : lo + length]
            else:  # crosses into the next piece(s)
                out[row] = self.read(start, start + length)
        return out


class WindowData:
    """The split, shard and batch logic of a corpus already turned into two streams.

    Subclasses set `train_stream`, `eval_stream`, `num_shards`, `vocab_size` and
    `manifest_sha256`, then call `_cut_shards`. `unit` names what one id is ("bytes",
    "tokens") in error messages."""

    unit = "tokens"
    train_stream: TokenStream
    eval_stream: TokenStream
    num_shards: int
    vocab_size: int
    manifest_sha256: str | None = None

    shard_for = staticmethod(shard_for)

    def _cut_shards(self) -> None:
        bounds = shard_bounds(len(self.train_stream), self.num_shards).tolist()
        self.shard_ranges = list(zip(bounds[:-1], bounds[1:], strict=True))

    def shard_stream(self, index: int) -> TokenStream:
        return self.train_stream.slice(*self.shard_ranges[index])

    def peer_stream(self, peer_id: str) -> TokenStream:
        return self.shard_stream(shard_for(peer_id, self.num_shards))

    def train_batches(
        self, peer_id: str, batch_size: int, seq_len: int, seed: int
    ) -> Iterator[Batch]:
        """Endless random windows from this peer's shard, as (x, y) int64 tensors of shape
        (batch_size, seq_len); y is x shifted left by one (y[:, t] follows x[:, t]). The
        stream depends only on (corpus, peer_id, seed): a restarted peer replays it. The
        checks run now, not at the first next()."""
        shard = self.peer_stream(peer_id)
        if len(shard) < seq_len + 1:
            raise ValueError(
                f"shard of {peer_id!r} holds {len(shard)} {self.unit}, "
                f"fewer than seq_len + 1 = {seq_len + 1}; "
                "use more data, fewer shards or a shorter seq_len"
            )
        peer_key = int.from_bytes(hashlib.sha256(peer_id.encode("utf-8")).digest()[:8], "big")
        return self._windows(shard, batch_size, seq_len, np.random.default_rng([seed, peer_key]))

    @staticmethod
    def _windows(
        stream: TokenStream, batch_size: int, seq_len: int, rng: np.random.Generator
    ) -> Iterator[Batch]:
        while True:
            starts = rng.integers(0, len(stream) - seq_len, size=batch_size)
            window = torch.from_numpy(stream.windows(starts, seq_len + 1))
            yield window[:, :-1], window[:, 1:]

    def eval_batches(self, batch_size: int, seq_len: int, num_batches: int) -> list[Batch]:
        """A fixed list of (x, y) batches: batch_size * num_batches windows at evenly spaced
        offsets over the eval stream (no randomness, so every peer evaluates on exactly the
        same ids and the estimate covers the whole held-out set)."""
        count = batch_size * num_batches
        size = len(self.eval_stream)
        if size < seq_len + 1:
            raise ValueError(
                f"eval split holds {size} {self.unit}, fewer than seq_len + 1 = {seq_len + 1}"
            )
        starts = np.linspace(0, size - seq_len - 1, count).astype(np.int64)
        windows = torch.from_numpy(self.eval_stream.windows(starts, seq_len + 1))
        return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
