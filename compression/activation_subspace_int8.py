"""`subspace-int8` activation codec: subspace coordinates as int8 under a per-token
power-of-two scale (k + 1 bytes per token)."""

from __future__ import annotations

import numpy as np

from .activation_subspace import SubspaceActivationCodec
from .base import CodecError
from .subspace_basis import BASIS_ID_NBYTES


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
