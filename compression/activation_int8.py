"""`int8` activation codec: per-token int8 codes and a float32 scale (d_model + 4 bytes per
token). The scale is float32, not float16: gradient rows are often below float16's normal
range."""

from __future__ import annotations

import numpy as np
import torch

from .activation_base import ActivationCodec
from .base import CodecError


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
