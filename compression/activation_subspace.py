"""`subspace` activation codec (Protocol Models, arXiv 2506.01260): the residual stream as
k float16 coordinates in a fixed subspace (2·k bytes per token). `SubspaceActivationCodec`
is also the base of the int8 and int4 coordinate variants (`activation_subspace_int8.py`,
`activation_subspace_int4.py`), which change only how the coordinates travel."""

from __future__ import annotations

import struct
from typing import ClassVar

import numpy as np
import torch

from .activation_base import FORWARD, ActivationCodec
from .base import CodecError
from .subspace_basis import BASIS_ID_NBYTES, SubspaceBasis, coordinate_nbytes

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
                f"subspace basis {self.basis.basis_id} is for d_model {self.basis.d_model}, "
                f"not {d_model}"
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
