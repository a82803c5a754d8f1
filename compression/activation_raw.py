"""`none` activation codec: the residual stream as raw float32, lossless (4·d_model bytes
per token); the baseline the compressed codecs are measured against."""

from __future__ import annotations

import numpy as np
import torch

from .activation_base import ActivationCodec


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
