"""The activation codec interface (`ActivationCodec`) and its wire header; one codec per
file (`activation_raw.py`, `activation_int8.py`, `activation_subspace*.py`), the registry in
`activation.py`.

Wire layout (little-endian, `ACTIVATION_HEADER`, 24 bytes), with base.py's conventions:
same magic byte, codec ids from the same namespace, a version and a CRC32:

    magic u8 (0x5C) | codec id u8 | version u8 | direction u8 (0 activation, 1 gradient)
    | batch u32 | seq u32 | d_model u32 | token ids crc32 u32 | crc32 u32 | body ...

The CRC covers the first 20 header bytes and the body (written and checked by base.py's
`seal`, `open_header` and `check_crc`, as for tensor codecs); the body starts with a fixed,
codec-specific prefix (subspace: basis id and scale exponent, 9 bytes; subspace-int8: basis
id; subspace-int4: basis id and 2·k bytes of per-coordinate scales and means). The token
ids CRC (over the ids as little-endian int64) ties a payload to its microbatch: decoding it
against other ids (a mixed-up microbatch, which for `subspace` would silently add the wrong
E0 rows) is refused. The direction byte stops a gradient from being decoded as an
activation.

Decode takes the shape from the receiver (token_ids.shape + d_model) and accepts a payload
only if it describes exactly that shape and body length; encode refuses NaN/Inf, and decode
refuses any payload that would produce them. Every failure is a CodecError saying why.
"""

from __future__ import annotations

import struct
import zlib
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from .base import MAGIC, CodecError, check_crc, open_header, register_codec_id, seal

ACTIVATION_HEADER = struct.Struct("<BBBBIIIII")
FORWARD, BACKWARD = 0, 1
_DIRECTION = {FORWARD: "an activation", BACKWARD: "a gradient"}
_U32_LIMIT = 1 << 32


def _check_token_ids(token_ids: object) -> torch.Tensor:
    """token_ids as a contiguous int64 CPU (batch, seq) tensor, or CodecError."""
    if not isinstance(token_ids, torch.Tensor):
        raise CodecError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dtype == torch.bool or token_ids.is_floating_point() or token_ids.is_complex():
        raise CodecError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
    if token_ids.ndim != 2 or max(token_ids.shape) >= _U32_LIMIT:
        raise CodecError(f"token_ids must be (batch, seq), got shape {tuple(token_ids.shape)}")
    return token_ids.detach().to("cpu", torch.int64).contiguous()


def _token_ids_crc(ids: torch.Tensor) -> int:
    return zlib.crc32(np.ascontiguousarray(ids.numpy(), dtype="<i8"))


class ActivationCodec(ABC):
    """Residual stream (or its gradient) ↔ bytes; stateless apart from caches, thread-safe.

    Subclasses set `name`, `codec_id` (a byte unused by base.py's codecs) and `prefix_nbytes`,
    and implement `_token_nbytes`, `_encode_rows` and `_decode_rows` on (tokens, d_model)
    float32 rows. The public methods do the shared checks and the header."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    version: ClassVar[int] = 1
    prefix_nbytes: ClassVar[int] = 0  # fixed body bytes before the per-token data

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "codec_id" in cls.__dict__:
            register_codec_id(cls.codec_id, f"activation:{cls.name}")

    # ---- public API ------------------------------------------------------------------

    def encode(self, h: torch.Tensor, token_ids: torch.Tensor) -> bytes:
        """Payload for the residual stream h (batch, seq, d_model) of the microbatch token_ids."""
        return self._encode(h, token_ids, FORWARD)

    def decode(self, payload: bytes, token_ids: torch.Tensor, d_model: int) -> torch.Tensor:
        """float32 CPU tensor (*token_ids.shape, d_model) from an `encode` payload, or
        CodecError."""
        return self._decode(payload, token_ids, d_model, FORWARD)

    def encode_grad(self, g: torch.Tensor, token_ids: torch.Tensor) -> bytes:
        """Payload for g = dL/dh (batch, seq, d_model), sent back to the previous stage."""
        return self._encode(g, token_ids, BACKWARD)

    def decode_grad(self, payload: bytes, token_ids: torch.Tensor, d_model: int) -> torch.Tensor:
        """float32 CPU tensor (*token_ids.shape, d_model) from an `encode_grad` payload."""
        return self._decode(payload, token_ids, d_model, BACKWARD)

    def bytes_per_token(self, d_model: int) -> float:
        """Exact wire bytes per token of a payload (either direction), without the fixed
        `header_nbytes`; `payload_nbytes` gives a whole payload."""
        return float(self._token_nbytes(d_model))

    @property
    def header_nbytes(self) -> int:
        """Fixed bytes of every payload: the shared header plus this codec's prefix."""
        return ACTIVATION_HEADER.size + self.prefix_nbytes

    def payload_nbytes(self, n_tokens: int, d_model: int) -> int:
        """Exact len() of a payload for n_tokens = batch·seq tokens, either direction."""
        return self.header_nbytes + n_tokens * self._token_nbytes(d_model)

    # ---- shared framing ---------------------------------------------------------------

    def _encode(self, tensor: torch.Tensor, token_ids: torch.Tensor, direction: int) -> bytes:
        what = _DIRECTION[direction]
        ids = _check_token_ids(token_ids)
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise CodecError(f"{self.name}: {what} must be a floating-point torch.Tensor")
        if (
            tensor.ndim != 3
            or tuple(tensor.shape[:2]) != tuple(ids.shape)
            or not 1 <= tensor.shape[2] < _U32_LIMIT
        ):
            raise CodecError(
                f"{self.name}: {what} of shape {tuple(tensor.shape)} is not token_ids "
                f"{tuple(ids.shape)} + (d_model,)"
            )
        batch, seq, d_model = tensor.shape
        rows = tensor.detach().float().reshape(batch * seq, d_model)
        if not bool(torch.isfinite(rows).all()):
            raise CodecError(f"{self.name}: refusing to encode {what} holding NaN/Inf")
        body = self._encode_rows(rows, ids.reshape(-1), direction)
        if len(body) != self.payload_nbytes(batch * seq, d_model) - ACTIVATION_HEADER.size:
            raise AssertionError(f"{self.name}: encoded {len(body)} body bytes, a codec bug")
        fields = (MAGIC, self.codec_id, self.version, direction, batch, seq, d_model)
        return seal(ACTIVATION_HEADER, (*fields, _token_ids_crc(ids)), body)

    def _decode(
        self, payload: bytes, token_ids: torch.Tensor, d_model: int, direction: int
    ) -> torch.Tensor:
        if (
            isinstance(d_model, bool)
            or not isinstance(d_model, int)
            or not 1 <= d_model < _U32_LIMIT
        ):
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        self._token_nbytes(d_model)  # the receiver's own d_model must suit the codec (ValueError)
        ids = _check_token_ids(token_ids)
        data, (sent_direction, batch, seq, sent_d, ids_crc, crc) = open_header(
            payload, ACTIVATION_HEADER, self.codec_id, self.version, self.name
        )
        if sent_direction != direction:
            sent = _DIRECTION.get(sent_direction, f"unknown direction {sent_direction}")
            raise CodecError(
                f"{self.name} payload carries {sent}, but {_DIRECTION[direction]} was expected"
            )
        if (batch, seq, sent_d) != (*ids.shape, d_model):
            raise CodecError(
                f"{self.name} payload describes shape {(batch, seq, sent_d)}, "
                f"expected {(*ids.shape, d_model)}"
            )
        if ids_crc != _token_ids_crc(ids):
            raise CodecError(
                f"{self.name} payload was encoded for other token ids (wrong microbatch?)"
            )
        n_tokens = batch * seq
        expected = self.payload_nbytes(n_tokens, d_model)
        if len(data) != expected:
            raise CodecError(
                f"{self.name} payload is {len(data)} bytes; "
                f"{n_tokens} tokens × d_model {d_model} need {expected}"
            )
        body = check_crc(data, ACTIVATION_HEADER, crc, self.name)
        rows = self._decode_rows(body, ids.reshape(-1), d_model, direction)
        if rows.dtype != torch.float32 or tuple(rows.shape) != (n_tokens, d_model):  # a codec bug
            raise AssertionError(f"{self.name}: decoded {rows.dtype}{tuple(rows.shape)}")
        if not bool(torch.isfinite(rows).all()):
            raise CodecError(f"{self.name} payload decodes to non-finite values")
        return rows.reshape(batch, seq, d_model)

    # ---- per-codec hooks --------------------------------------------------------------

    @abstractmethod
    def _token_nbytes(self, d_model: int) -> int:
        """Body bytes per token after the prefix."""

    @abstractmethod
    def _encode_rows(self, rows: torch.Tensor, ids: torch.Tensor, direction: int) -> bytes:
        """Body (prefix + per-token data) for finite float32 rows (tokens, d_model) on any
        device; ids are the flat int64 CPU token ids."""

    @abstractmethod
    def _decode_rows(
        self, body: memoryview, ids: torch.Tensor, d_model: int, direction: int
    ) -> torch.Tensor:
        """float32 CPU rows (tokens, d_model) from a CRC-checked body of the exact length."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
