"""`subspace-int4` activation codec: subspace coordinates at 4 bits, centred and scaled per
payload, with a per-token quarter-octave scale (ceil(k/2) + 1 bytes per token)."""

from __future__ import annotations

import numpy as np

from .activation_subspace import SubspaceActivationCodec
from .base import CodecError
from .subspace_basis import BASIS_ID_NBYTES

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
        # int8 quarter-octave bytes cannot overflow float32:
        # 7 · 2^31.75 · 2^31.75 + 32 · 2^31.75 < 3.4e38
        return (
            (codes[:, :k] - 8).astype(np.float32) * token_scale[:, None] * spread + mean
        ).astype(np.float32)
