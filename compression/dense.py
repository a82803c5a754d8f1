"""Dense codecs: every element sent as a little-endian float.

`fp32` is the lossless baseline (plain DiLoCo, Douillard et al. 2023) that every compressed
codec is measured against; `fp16` halves it (hivemind's Float16Compression) and is kept for
completeness. Both bodies are the raw array, so the body length alone proves the element
count before anything is allocated.
"""

from __future__ import annotations

import numpy as np

from .base import Codec, CodecError

FP16_MAX = float(np.finfo(np.float16).max)


class _DenseCodec(Codec):
    """Raw little-endian floats of one width; subclasses pick the numpy dtype."""

    wire_dtype: np.dtype

    def _encode_values(self, values: np.ndarray) -> bytes:
        return values.astype(self.wire_dtype, copy=False).tobytes()

    def _decode_values(self, body: memoryview, count: int) -> np.ndarray:
        expected = self._body_nbytes(count)
        if len(body) != expected:
            raise CodecError(
                f"{self.name} body is {len(body)} bytes; {count} elements need {expected}"
            )
        # astype copies into a writable, native-endian float32 array we own
        return np.frombuffer(body, dtype=self.wire_dtype, count=count).astype(np.float32)

    def _body_nbytes(self, count: int) -> int:
        return count * self.wire_dtype.itemsize


class Fp32Codec(_DenseCodec):
    """Lossless: raw little-endian float32 (4 bytes per element)."""

    name = "fp32"
    codec_id = 1
    wire_dtype = np.dtype("<f4")


class Fp16Codec(_DenseCodec):
    """Raw little-endian float16 (2 bytes per element). Values beyond ±65504 are refused
    rather than sent as Inf, which every receiver would reject anyway."""

    name = "fp16"
    codec_id = 2
    wire_dtype = np.dtype("<f2")

    def _encode_values(self, values: np.ndarray) -> bytes:
        if values.size and float(np.abs(values).max()) > FP16_MAX:
            raise CodecError(f"fp16 cannot hold values beyond ±{FP16_MAX:g}; use fp32 or int8")
        return super()._encode_values(values)
