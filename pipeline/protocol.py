"""The messages between stage 0 (the driver) and the stage peers, built and checked here
on both sides; `peer/` only carries them (msgpack envelopes, HMAC, size limits).

    POST /stage/forward   {key, stage, round, codec, tokens, shape, act[, scale]}  → {act}
    POST /stage/infer     (the same, for evaluation: nothing is kept)      → {act}
    POST /stage/backward  {key, stage, codec, tokens, shape, grad}        → {grad}
    POST /stage/step      {stage, step, round, train_loss}                → {stepped, step}

`key` names a microbatch attempt (unique per driver), `tokens` are its token ids (uint8
bytes for vocabularies up to 256, int32 little-endian above) with `shape` = (batch,
seq): every stage needs them to rebuild a subspace-compressed activation. `act`/`grad` are
activation-codec payloads (compression/activation.py) named by `codec`. A stage answers a
forward only once it has applied outer round `round`, so a microbatch never mixes two
rounds' weights.

Who waits for what, and timeouts: the driver bounds every hop by `hop_timeout_s`; an
unreachable or failing peer is banned by the router and the hop goes to another replica
of that stage (forward), or the whole microbatch runs again (backward: only the peer that
ran the forward holds its input). A stage that gets a backward for an unknown key answers
404 (see worker.UnknownMicrobatch).

`scale` (training forwards only, default 1): SkipPipe's residual scale for this stage on
this path, h + scale·(f(h) − h) (worker.residual_scale); at most MAX_RESIDUAL_SCALE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

MAX_TOKENS = 1 << 20  # per message: batch × seq
MAX_RESIDUAL_SCALE = 16.0  # 1/p for a stage on 1 path in 16


class StageRequestError(ValueError):
    """A malformed stage message (the peer answers 400)."""


@dataclass(frozen=True)
class Microbatch:
    """What every hop message carries about the microbatch."""

    key: str
    tokens: torch.Tensor  # (batch, seq) int64

    def to_wire(self) -> dict[str, Any]:
        return {"key": self.key, "tokens": self._token_bytes, "shape": list(self.tokens.shape)}

    @cached_property
    def _token_bytes(self) -> bytes:
        """The ids as sent (computed once: every hop of the microbatch carries them)."""
        ids = self.tokens.cpu().numpy()
        data = ids.astype(np.uint8) if ids.size == 0 or ids.max() < 256 else ids.astype("<i4")
        return data.tobytes()

    @classmethod
    def from_wire(cls, payload: dict[str, Any], vocab_size: int, max_seq_len: int) -> Microbatch:
        key, data, shape = payload.get("key"), payload.get("tokens"), payload.get("shape")
        if not isinstance(key, str) or not 0 < len(key) <= 128:
            raise StageRequestError("key must be a string of 1..128 characters")
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        ):
            raise StageRequestError("shape must be [batch, seq] with positive integers")
        batch, seq = shape
        if seq > max_seq_len or batch * seq > MAX_TOKENS:
            raise StageRequestError(
                f"microbatch {batch}x{seq} exceeds the limits "
                f"(seq <= {max_seq_len}, tokens <= {MAX_TOKENS})"
            )
        if not isinstance(data, bytes):
            raise StageRequestError("tokens must be bytes")
        width = len(data) // (batch * seq) if batch * seq else 0
        if width not in (1, 4) or len(data) != width * batch * seq:
            raise StageRequestError(
                f"tokens hold {len(data)} bytes, "
                f"expected {batch * seq} (uint8) or {4 * batch * seq} (int32)"
            )
        ids = (
            np.frombuffer(data, dtype=np.uint8 if width == 1 else "<i4")
            .astype(np.int64)
            .reshape(batch, seq)
        )
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise StageRequestError(f"token ids outside 0..{vocab_size - 1}")
        return cls(key, torch.from_numpy(ids))


def check_int(payload: dict[str, Any], name: str, low: int = 0, high: int = 2**62) -> int:
    value = payload.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise StageRequestError(f"{name} must be an integer in {low}..{high}")
    return value


def check_bytes(payload: dict[str, Any], name: str) -> bytes:
    value = payload.get(name)
    if not isinstance(value, bytes):
        raise StageRequestError(f"{name} must be bytes")
    return value


def check_loss(payload: dict[str, Any]) -> float | None:
    value = payload.get("train_loss")
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise StageRequestError("train_loss must be a finite number")
    return float(value)


def check_scale(payload: dict[str, Any]) -> float:
    """A training forward's residual scale: absent means 1."""
    value = payload.get("scale", 1.0)
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not 0.0 < value <= MAX_RESIDUAL_SCALE
    ):
        raise StageRequestError(f"scale must be a number in (0, {MAX_RESIDUAL_SCALE}]")
    return float(value)
