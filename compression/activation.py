"""Activation codecs: the residual stream between pipeline stages, as bytes.

Stage s sends stage s+1 the residual stream h (batch, seq, d_model) of each microbatch and
gets back its gradient g = dL/dh. The message carries the microbatch's token ids anyway
(stage peers need them), so a codec may use them.

    codec = get_activation_codec("int8")              # "none", "int8", "subspace" (basis=...)
    payload = codec.encode(h, token_ids)              # forward
    h = codec.decode(payload, token_ids, d_model)     # float32 CPU (batch, seq, d_model)
    payload = codec.encode_grad(g, token_ids)         # backward
    g = codec.decode_grad(payload, token_ids, d_model)

Codecs (bytes per token of the body; forward and backward payloads are the same size):

    none      4·d       raw float32, lossless
    int8      d + 4     per token: int8 codes of x / s, s = absmax / 127 as float32 (not
                        float16: gradient rows are often below float16's normal range)
    subspace  2·k       k float16 coordinates in a fixed subspace (see SubspaceActivationCodec)
    subspace-int8  k + 1  k int8 coordinates and a power-of-two scale (SubspaceInt8ActivationCodec)
    subspace-int4  ceil(k/2) + 1  k 4-bit coordinates, centred and scaled per payload, and a
                        per-token scale (SubspaceInt4ActivationCodec)

plus `header_nbytes` per payload: 24, 33 for subspace, 32 for subspace-int8 and 32 + 2·k for subspace-int4. At d_model = 128: 512, 132 and
(k = 31, ratio 8) 62 bytes per token.

Wire layout (little-endian, `ACTIVATION_HEADER`, 24 bytes), with base.py's conventions:
same magic byte, codec ids from the same namespace, a version and a CRC32:

    magic u8 (0x5C) | codec id u8 | version u8 | direction u8 (0 activation, 1 gradient)
    | batch u32 | seq u32 | d_model u32 | token ids crc32 u32 | crc32 u32 | body ...

The CRC covers the first 20 header bytes and the body; the body starts with a fixed,
codec-specific prefix (subspace: basis id and scale exponent, 9 bytes; subspace-int8: basis id). The token ids CRC
(over the ids as little-endian int64) ties a payload to its microbatch: decoding it against
other ids (a mixed-up microbatch, which for `subspace` would silently add the wrong E0 rows)
is refused. The direction byte stops a gradient from being decoded as an activation.

Decode takes the shape from the receiver (token_ids.shape + d_model) and accepts a payload
only if it describes exactly that shape and body length; encode refuses NaN/Inf, and decode
refuses any payload that would produce them. Every failure is a CodecError saying why.
"""

from __future__ import annotations

import inspect
import struct
import zlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from .base import MAGIC, CodecError, codec_name, payload_bytes, register_codec_id
from .subspace_basis import BASIS_ID_NBYTES, SubspaceBasis, coordinate_nbytes

ACTIVATION_HEADER = struct.Struct("<BBBBIIIII")
_CRC_OFFSET = ACTIVATION_HEADER.size - 4
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
        """float32 CPU tensor (*token_ids.shape, d_model) from an `encode` payload, or CodecError."""
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
        prefix = ACTIVATION_HEADER.pack(
            MAGIC,
            self.codec_id,
            self.version,
            direction,
            batch,
            seq,
            d_model,
            _token_ids_crc(ids),
            0,
        )[:_CRC_OFFSET]
        crc = zlib.crc32(body, zlib.crc32(prefix))
        return b"".join((prefix, struct.pack("<I", crc), body))

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
        data = payload_bytes(payload)
        if len(data) < ACTIVATION_HEADER.size:
            raise CodecError(
                f"payload is {len(data)} bytes, shorter than the {ACTIVATION_HEADER.size}-byte header"
            )
        magic, codec_id, version, sent_direction, batch, seq, sent_d, ids_crc, crc = (
            ACTIVATION_HEADER.unpack_from(data)
        )
        if magic != MAGIC:
            raise CodecError(
                f"bad magic byte 0x{magic:02x} (want 0x{MAGIC:02x}): not a shoal codec payload"
            )
        if codec_id != self.codec_id:
            raise CodecError(
                f"payload was encoded by {codec_name(codec_id)!r}, not 'activation:{self.name}'"
            )
        if version != self.version:
            raise CodecError(
                f"{self.name} payload version {version} is not supported (want {self.version})"
            )
        if sent_direction != direction:
            sent = _DIRECTION.get(sent_direction, f"unknown direction {sent_direction}")
            raise CodecError(
                f"{self.name} payload carries {sent}, but {_DIRECTION[direction]} was expected"
            )
        if (batch, seq, sent_d) != (*ids.shape, d_model):
            raise CodecError(
                f"{self.name} payload describes shape {(batch, seq, sent_d)}, expected {(*ids.shape, d_model)}"
            )
        if ids_crc != _token_ids_crc(ids):
            raise CodecError(
                f"{self.name} payload was encoded for other token ids (wrong microbatch?)"
            )
        n_tokens = batch * seq
        expected = self.payload_nbytes(n_tokens, d_model)
        if len(data) != expected:
            raise CodecError(
                f"{self.name} payload is {len(data)} bytes; {n_tokens} tokens × d_model {d_model} need {expected}"
            )
        body = data[ACTIVATION_HEADER.size :]
        if zlib.crc32(body, zlib.crc32(data[:_CRC_OFFSET])) != crc:
            raise CodecError(f"{self.name} payload fails its CRC32 check (corrupted in transit?)")
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


class RawActivationCodec(ActivationCodec):
    """Lossless: raw little-endian float32, 4·d_model bytes per token."""

    name = "none"
    codec_id = 16

    def _token_nbytes(self, d_model: int) -> int:
        return 4 * d_model

    def _encode_rows(self, rows: torch.Tensor, ids: torch.Tensor, direction: int) -> bytes:
        return rows.cpu().numpy().astype("<f4", copy=False).tobytes()

    def _decode_rows(
        self, body: memoryview, ids: torch.Tensor, d_model: int, direction: int
    ) -> torch.Tensor:
        values = np.frombuffer(body, dtype="<f4").astype(np.float32)  # a writable copy we own
        return torch.from_numpy(values).reshape(ids.numel(), d_model)


class Int8ActivationCodec(ActivationCodec):
    """Per-token int8: row r is sent as its scale s_r = absmax_r / 127 (float32) and the int8
    codes round(x / s_r) in [-127, 127]; d_model + 4 bytes per token, error ≤ s_r / 2.

    Body: scales float32[tokens] | codes int8[tokens, d_model]. A zero row has s = 0."""

    name = "int8"
    codec_id = 17

    def _token_nbytes(self, d_model: int) -> int:
        return d_model + 4

    def _encode_rows(self, rows: torch.Tensor, ids: torch.Tensor, direction: int) -> bytes:
        scales = rows.abs().amax(dim=1) / 127.0
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return b"".join(
            (scales.cpu().numpy().astype("<f4").tobytes(), codes.cpu().numpy().tobytes())
        )

    def _decode_rows(
        self, body: memoryview, ids: torch.Tensor, d_model: int, direction: int
    ) -> torch.Tensor:
        n_tokens = ids.numel()
        scales = np.frombuffer(body, dtype="<f4", count=n_tokens)
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise CodecError("int8 payload holds a negative or non-finite row scale")
        codes = np.frombuffer(body, dtype=np.int8, offset=4 * n_tokens).reshape(n_tokens, d_model)
        if codes.size and codes.min() < -127:
            raise CodecError("int8 payload holds code -128, which the encoder never produces")
        with np.errstate(over="ignore"):  # a huge scale overflows; refused as non-finite
            values = codes.astype(np.float32) * scales.astype(np.float32)[:, None]
        return torch.from_numpy(values)


# fp16 transport of subspace coordinates: the payload's largest |coordinate| is scaled by a
# power of two into [2^14, 2^15) (exact in float32, and far from float16's ±65504 limit), so
# small gradients keep float16's full 11-bit precision instead of falling into its
# subnormals (< 6.1e-5) — the loss-scaling idea of mixed-precision training, per payload.
_TARGET_EXPONENT = 15


class SubspaceActivationCodec(ActivationCodec):
    """Protocol Models' subspace codec (arXiv 2506.01260): 2·k bytes per token.

    Forward: z = (h − E0[token]) U, sent as k float16 values per token; decode E0[token] + z U^T.
    Backward: U^T g sent the same way; decode U U^T g. Body: basis id (8 bytes) | scale
    exponent e (i8) | float16[tokens, k] holding z·2^e.

    Why this is exact when every learnable write to the residual stream lies in span(U)
    (`pipeline/subspace.confine_`): the stream is then h = E0[token] + U c, so the forward
    recovers h up to the float16 rounding of c. Backward: each upstream block adds U·(…)
    to the stream (its confined output projections W = U U^T W), so the chain rule reaches
    that block's inputs, and its non-writing parameters (qkv, gate, up, norm gains), only
    through U^T g: their gradients are exact. The part of g outside span(U) only flows on
    along the residual connections, unchanged, to the writing weights and the embedding:
    dL/dW = g x^T and dL/dE[token] lack it, and only their projections U U^T dL/dW and
    (dL/dE) U U^T are exact — which is all a confined parameter may move by.
    `pipeline/subspace.confine_grads_` applies that projection before the optimizer step,
    so a run with this codec follows an uncompressed confined run (tests/pipeline).
    """

    name = "subspace"
    codec_id = 18
    coordinates: ClassVar[str] = (
        "fp16"  # how the coordinates travel (subspace_basis.COORDINATE_BITS)
    )
    prefix_nbytes = BASIS_ID_NBYTES + 1  # basis id, scale exponent i8

    def __init__(self, basis: SubspaceBasis) -> None:
        if not isinstance(basis, SubspaceBasis):
            raise TypeError(f"subspace codec needs a SubspaceBasis, got {type(basis).__name__}")
        self.basis = basis

    def _token_nbytes(self, d_model: int) -> int:
        self._check_d_model(d_model, ValueError)
        return coordinate_nbytes(self.basis.k, self.coordinates)

    def _check_d_model(self, d_model: int, error: type[Exception]) -> None:
        if d_model != self.basis.d_model:
            raise error(
                f"subspace basis {self.basis.basis_id} is for d_model {self.basis.d_model}, not {d_model}"
            )

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.basis.vocab_size):
            raise CodecError(f"subspace codec: token ids outside [0, {self.basis.vocab_size})")

    def _encode_rows(self, rows: torch.Tensor, ids: torch.Tensor, direction: int) -> bytes:
        self._check_d_model(rows.shape[1], CodecError)
        U, E0 = self.basis.on(rows.device)
        if direction == FORWARD:
            self._check_ids(ids)
            rows = rows - E0[ids.to(rows.device)]
        return self.basis.basis_id_bytes + self._pack_coordinates((rows @ U).cpu().numpy())

    def _decode_rows(
        self, body: memoryview, ids: torch.Tensor, d_model: int, direction: int
    ) -> torch.Tensor:
        self._check_d_model(d_model, ValueError)
        basis_id = bytes(body[:BASIS_ID_NBYTES])
        if basis_id != self.basis.basis_id_bytes:
            raise CodecError(
                f"subspace basis out of sync: payload was projected on basis {basis_id.hex()}, "
                f"this peer holds {self.basis.basis_id}"
            )
        coords = self._unpack_coordinates(body[BASIS_ID_NBYTES:], ids.numel())
        rows = torch.from_numpy(coords).reshape(ids.numel(), self.basis.k) @ self.basis.U.T
        if direction == FORWARD:
            self._check_ids(ids)
            rows = rows + self.basis.E0[ids]
        return rows

    # how the coordinates (tokens, k) travel: float16 under one exponent per payload

    def _pack_coordinates(self, coords: np.ndarray) -> bytes:
        peak = float(np.abs(coords).max(initial=0.0))
        exponent = (
            0 if peak == 0.0 else min(127, max(-127, _TARGET_EXPONENT - int(np.frexp(peak)[1])))
        )
        return struct.pack("<b", exponent) + np.ldexp(coords, exponent).astype("<f2").tobytes()

    def _unpack_coordinates(self, data: memoryview, n_tokens: int) -> np.ndarray:
        (exponent,) = struct.unpack_from("<b", data)
        scaled = np.frombuffer(data, dtype="<f2", offset=1)
        if not np.isfinite(scaled).all():
            raise CodecError("subspace payload holds non-finite float16 coordinates")
        with np.errstate(over="ignore"):  # a lying exponent overflows; refused as non-finite
            return np.ldexp(scaled.astype(np.float32), -exponent)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.basis!r})"


class SubspaceInt8ActivationCodec(SubspaceActivationCodec):
    """The subspace codec with int8 coordinates: k + 1 bytes per token, so about twice the
    k of float16 coordinates at the same bytes. Per token r, an exponent e_r (i8) and the
    codes round(z_r / 2^e_r) in [-127, 127], with 2^e_r the smallest power of two at or above
    max|z_r| / 127 (error ≤ 2^(e_r − 1) ≤ max|z_r| / 127). A per-token scale, because
    tokens' coordinates differ in size by orders of magnitude (gradients especially);
    a power of two, so the scale costs one byte and decodes exactly.

    Body: basis id (8 bytes) | exponents i8[tokens] | codes int8[tokens, k]."""

    name = "subspace-int8"
    codec_id = 19
    coordinates = "int8"
    prefix_nbytes = BASIS_ID_NBYTES

    def _pack_coordinates(self, coords: np.ndarray) -> bytes:
        peak = np.abs(coords).max(axis=1, initial=0.0) / 127.0
        mantissa, exponent = np.frexp(peak)  # peak = m·2^e, m in [0.5, 1): 2^e >= peak
        exponent = np.where(mantissa == 0.5, exponent - 1, exponent)  # an exact power of two
        exponent = np.where(peak > 0, exponent, 0).clip(-127, 127).astype(np.int8)
        codes = (
            np.rint(np.ldexp(coords, -exponent.astype(np.int32)[:, None]))
            .clip(-127, 127)
            .astype(np.int8)
        )
        return exponent.tobytes() + codes.tobytes()

    def _unpack_coordinates(self, data: memoryview, n_tokens: int) -> np.ndarray:
        exponent = np.frombuffer(data, dtype=np.int8, count=n_tokens).astype(np.int32)
        codes = np.frombuffer(data, dtype=np.int8, offset=n_tokens)
        if codes.size and codes.min() < -127:
            raise CodecError(
                "subspace-int8 payload holds code -128, which the encoder never produces"
            )
        with np.errstate(over="ignore"):  # a huge exponent overflows; refused as non-finite
            return np.ldexp(
                codes.reshape(n_tokens, self.basis.k).astype(np.float32), exponent[:, None]
            )


# int4 coordinates: per-token scales 2^(q/4), q an int8 — quarter-octave steps, so a token's
# scale overshoots its peak by at most 19% (a power of two wastes up to half of the 15 levels).
# The four mantissas are fixed float32 constants, so every peer decodes bit-identically.
_QUARTER_OCTAVES = np.array(
    [1.0, 1.189207115002721, 1.4142135623730951, 1.681792830507429], dtype=np.float32
)
_INT4_LEVEL = 7  # codes in [-7, 7], sent as nibbles code + 8 in [1, 15]
_MEAN_STEPS = 4  # a coordinate's mean travels as an int8 count of quarter deviations


def _quarter_octave_scale(q: np.ndarray) -> np.ndarray:
    """2^(q/4) as float32 for int8 q (q = -128: 0, a token whose coordinates are all zero)."""
    q = q.astype(np.int32)
    return np.where(q > -128, np.ldexp(_QUARTER_OCTAVES[q % 4], q // 4), 0.0).astype(np.float32)


def _quarter_octaves_at_or_above(x: np.ndarray) -> np.ndarray:
    """The smallest int8 q in [-127, 127] with 2^(q/4) >= x (x > 0), as int8."""
    with np.errstate(divide="ignore"):
        q = np.ceil(4 * np.log2(x)).clip(-127, 127)
    return (
        np.where(_quarter_octave_scale(q) < x, q + 1, q).clip(-127, 127).astype(np.int8)
    )  # log2's rounding


class SubspaceInt4ActivationCodec(SubspaceActivationCodec):
    """The subspace codec with 4-bit coordinates: ceil(k/2) + 1 bytes per token, so about
    four times the k of float16 coordinates at the same bytes.

    Four bits are coarse, so the codec spends them where the coordinates vary. Trained
    streams' coordinates carry per-dimension offsets of several standard deviations and
    unequal per-dimension spreads; a plain per-token scale would spend the 15 levels on
    those. So, per payload, each coordinate j
    is scaled by s_j = 2^(p_j/4), the quarter-octave step at or above its standard
    deviation over the payload's tokens, and centred on m_j = n_j·s_j/4, its mean rounded
    to quarter deviations (p_j, n_j int8: 2·k bytes a payload); then each token r is
    scaled by its own t_r = 2^(q_r/4), the smallest quarter-octave step at or above
    max_j |z_rj| / 7, and sent as round(z_r / t_r) in [-7, 7]. The encoder uses the rounded
    s, m and t, so only the codes' rounding errs: under 12% of the coordinates' spread
    for offsets up to 4 deviations (tests/compression/test_activation.py).

    Body: basis id (8 bytes) | p i8[k] | n i8[k] | q i8[tokens] (-128: a zero token) |
    nibbles u8[tokens, ceil(k/2)] (code + 8; low nibble first; an odd k pads code 0)."""

    name = "subspace-int4"
    codec_id = 20
    coordinates = "int4"

    @property
    def prefix_nbytes(self) -> int:  # type: ignore[override]
        return BASIS_ID_NBYTES + 2 * self.basis.k

    def _pack_coordinates(self, coords: np.ndarray) -> bytes:
        n_tokens, k = coords.shape
        spread = coords.std(axis=0, dtype=np.float64) if n_tokens else np.ones(k)
        spread_q = _quarter_octaves_at_or_above(np.where(spread > 0, spread, 1.0))
        spread = _quarter_octave_scale(spread_q)
        mean = coords.mean(axis=0, dtype=np.float64) if n_tokens else np.zeros(k)
        mean_codes = np.rint(mean / (spread / _MEAN_STEPS)).clip(-127, 127).astype(np.int8)
        z = (coords - mean_codes * (spread / _MEAN_STEPS)) / spread
        peak = np.abs(z).max(axis=1, initial=0.0) / _INT4_LEVEL
        token_q = np.where(
            peak > 0, _quarter_octaves_at_or_above(np.where(peak > 0, peak, 1.0)), -128
        ).astype(np.int8)
        token_scale = np.where(
            token_q > -128, _quarter_octave_scale(token_q), 1.0
        )  # a zero row codes 0s under any scale
        codes = (
            np.rint(z / token_scale[:, None]).clip(-_INT4_LEVEL, _INT4_LEVEL).astype(np.int16) + 8
        )
        if k % 2:
            codes = np.concatenate([codes, np.full((n_tokens, 1), 8, np.int16)], axis=1)
        nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
        return b"".join(
            (spread_q.tobytes(), mean_codes.tobytes(), token_q.tobytes(), nibbles.tobytes())
        )

    def _unpack_coordinates(self, data: memoryview, n_tokens: int) -> np.ndarray:
        k = self.basis.k
        spread = _quarter_octave_scale(np.frombuffer(data, dtype=np.int8, count=k))
        mean = np.frombuffer(data, dtype=np.int8, count=k, offset=k) * (spread / _MEAN_STEPS)
        token_scale = _quarter_octave_scale(
            np.frombuffer(data, dtype=np.int8, count=n_tokens, offset=2 * k)
        )
        nibbles = np.frombuffer(data, dtype=np.uint8, offset=2 * k + n_tokens).reshape(
            n_tokens, (k + 1) // 2
        )
        codes = np.empty((n_tokens, 2 * nibbles.shape[1]), dtype=np.int16)
        codes[:, 0::2], codes[:, 1::2] = nibbles & 15, nibbles >> 4
        if codes.size and codes.min() == 0:
            raise CodecError(
                "subspace-int4 payload holds nibble 0, which the encoder never produces"
            )
        # int8 quarter-octave bytes cannot overflow float32 (7 · 2^31.75 · 2^31.75 + 32 · 2^31.75 < 3.4e38)
        return (
            (codes[:, :k] - 8).astype(np.float32) * token_scale[:, None] * spread + mean
        ).astype(np.float32)


ACTIVATION_CODECS: dict[str, type[ActivationCodec]] = {
    codec.name: codec
    for codec in (
        RawActivationCodec,
        Int8ActivationCodec,
        SubspaceActivationCodec,
        SubspaceInt8ActivationCodec,
        SubspaceInt4ActivationCodec,
    )
}


def get_activation_codec(name: str, **options: Any) -> ActivationCodec:
    """An activation codec by name, e.g. `get_activation_codec("subspace", basis=basis)`.

    ValueError naming the known codecs for an unknown name; TypeError for a wrong option."""
    try:
        codec_class = ACTIVATION_CODECS[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(ACTIVATION_CODECS))
        raise ValueError(
            f"unknown activation codec {name!r}; known activation codecs: {known}"
        ) from None
    try:
        inspect.signature(codec_class).bind(**options)
    except TypeError as exc:
        raise TypeError(f"activation codec {name!r} options {sorted(options)}: {exc}") from None
    return codec_class(**options)
