"""The fixed subspace that the `subspace` activation codec (activation.py) projects onto.

Protocol Models (Ramasinghe et al., arXiv 2506.01260) confine the residual stream of a
pipeline-parallel transformer to E0[token] + span(U): E0 (vocab × d_model) is a fixed,
full-rank token embedding that never travels, U (d_model × k) has orthonormal columns, and
every learnable write to the residual stream is kept inside span(U) (`pipeline/subspace.py`).
A stage boundary then only has to send the k coordinates U^T (h − E0[token]) per token.

Every peer of a run must hold bit-identical U and E0, or decoding would reconstruct garbage
without noticing. `from_seed` draws U from a private CPU generator (float32 Gaussian, as the
model init does), orthonormalises it by a float64 QR and rounds to float32: LAPACK's
summation order may differ between CPUs, but float64 differences (~1e-16) almost never
survive rounding to float32. If they ever do, or a peer runs with another seed or E0,
`basis_id` differs: every subspace payload carries it, and decode refuses a payload from
another basis ("basis out of sync") instead of reconstructing the wrong activations.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading

import torch

BASIS_ID_NBYTES = 8
# U is within this distance (max |U^T U − I|) of orthonormal, or the basis is refused
_ORTHONORMAL_TOL = 1e-4


def token_id_nbytes(vocab_size: int) -> int:
    """Bytes one token id needs on the wire: 1 for a byte vocabulary (≤ 256), else 2 or 4."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return 1 if vocab_size <= 1 << 8 else 2 if vocab_size <= 1 << 16 else 4


# bits per token of the coordinates, as (per coordinate, fixed; whole bytes on the wire):
# float16 values under one per-payload exponent, int8 codes under a per-token exponent byte,
# or 4-bit codes (two a byte) under a per-token scale byte
COORDINATE_BITS = {"fp16": (16, 0), "int8": (8, 8), "int4": (4, 8)}


def coordinate_nbytes(k: int, coordinates: str) -> int:
    """Bytes per token of k coordinates in the given format (`COORDINATE_BITS`), rounded up."""
    if coordinates not in COORDINATE_BITS:
        raise ValueError(
            f"coordinates must be one of {sorted(COORDINATE_BITS)}, got {coordinates!r}"
        )
    per_coordinate, fixed = COORDINATE_BITS[coordinates]
    return -(-(per_coordinate * k + fixed) // 8)


def subspace_dim_for_ratio(
    d_model: int, ratio: float, vocab_size: int = 256, coordinates: str = "fp16"
) -> int:
    """The largest k whose subspace payload is at least `ratio` times smaller than raw float32.

    Per token, raw float32 is 4·d_model bytes; the subspace codec sends b(k) =
    `coordinate_nbytes(k, coordinates)` bytes (float16: 2k; int8 with a scale exponent:
    k + 1; int4 with a scale byte: ceil(k/2) + 1) and needs the token id, which the message
    carries anyway but which would not be needed for raw activations, so it is counted:
    t = `token_id_nbytes(vocab_size)` (1 byte for the byte model). So k = max{k : 4·d /
    (b(k) + t) ≥ ratio}, at least 1 (for a ratio that even k = 1 misses) and at most
    d_model. The fixed per-payload header is not counted.

    d_model = 128: ratio 8 → k = 31, ratio 32 → k = 7, ratio 100 → k = 2 (float16); ratio 32
    → k = 14 (int8), k = 28 (int4)."""
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be a positive int, got {d_model!r}")
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, int | float)
        or not (math.isfinite(ratio) and ratio > 0)
    ):
        raise ValueError(f"ratio must be a positive finite number, got {ratio!r}")
    coordinate_nbytes(1, coordinates)  # the format must be known
    token_id = token_id_nbytes(vocab_size)
    best = 1
    for k in range(1, d_model + 1):  # exact comparison, no float floor() at the boundary
        if 4 * d_model < ratio * (coordinate_nbytes(k, coordinates) + token_id):
            break
        best = k
    return best


class SubspaceBasis:
    """U (d_model × k, orthonormal columns) and E0 (vocab × d_model), float32 on the CPU.

    Immutable once built (the tensors are private copies); `basis_id` is the first 8 bytes
    of a SHA-256 over both, as 16 hex characters. Copies on other devices are cached."""

    def __init__(self, U: torch.Tensor, E0: torch.Tensor) -> None:
        if not isinstance(U, torch.Tensor) or not isinstance(E0, torch.Tensor):
            raise TypeError("U and E0 must be torch tensors")
        if U.ndim != 2 or not 1 <= U.shape[1] <= U.shape[0]:
            raise ValueError(f"U must be (d_model, k) with 1 <= k <= d_model, got {tuple(U.shape)}")
        if E0.ndim != 2 or E0.shape[0] < 1 or E0.shape[1] != U.shape[0]:
            raise ValueError(f"E0 must be (vocab, d_model={U.shape[0]}), got {tuple(E0.shape)}")
        self._U = U.detach().to("cpu", torch.float32).contiguous().clone()
        self._E0 = E0.detach().to("cpu", torch.float32).contiguous().clone()
        if not (torch.isfinite(self._U).all() and torch.isfinite(self._E0).all()):
            raise ValueError("U and E0 must be finite")
        gram_error = (
            (self._U.T.double() @ self._U.double() - torch.eye(self.k, dtype=torch.float64))
            .abs()
            .max()
        )
        if gram_error > _ORTHONORMAL_TOL:
            raise ValueError(
                f"U's columns are not orthonormal (max |U^T U - I| = {float(gram_error):.2e})"
            )
        digest = hashlib.sha256(b"shoal-subspace-basis-v1")
        digest.update(struct.pack("<III", self.d_model, self.k, self.vocab_size))
        digest.update(self._U.numpy().astype("<f4", copy=False).tobytes())
        digest.update(self._E0.numpy().astype("<f4", copy=False).tobytes())
        self.basis_id_bytes = digest.digest()[:BASIS_ID_NBYTES]
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_seed(cls, d_model: int, k: int, seed: int, E0: torch.Tensor) -> SubspaceBasis:
        """U = Q of the QR of a (d_model × k) standard Gaussian drawn from a CPU generator
        seeded with `seed`; column signs fixed by diag(R) > 0 so Q is unique."""
        if not 1 <= k <= d_model:
            raise ValueError(f"subspace dimension k must be in [1, d_model={d_model}], got {k}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        gaussian = torch.randn(d_model, k, generator=generator, dtype=torch.float32)
        q, r = torch.linalg.qr(gaussian.double(), mode="reduced")
        signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
        return cls((q * signs).float(), E0)

    @classmethod
    def for_ratio(cls, d_model: int, ratio: float, seed: int, E0: torch.Tensor) -> SubspaceBasis:
        """`from_seed` with k = `subspace_dim_for_ratio(d_model, ratio, vocab_size=len(E0))`."""
        return cls.from_seed(d_model, subspace_dim_for_ratio(d_model, ratio, E0.shape[0]), seed, E0)

    @property
    def U(self) -> torch.Tensor:
        return self._U

    @property
    def E0(self) -> torch.Tensor:
        return self._E0

    @property
    def d_model(self) -> int:
        return self._U.shape[0]

    @property
    def k(self) -> int:
        return self._U.shape[1]

    @property
    def vocab_size(self) -> int:
        return self._E0.shape[0]

    @property
    def basis_id(self) -> str:
        return self.basis_id_bytes.hex()

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, E0) as float32 on `device`, copied once per device."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._U, self._E0
        with self._lock:
            if device not in self._by_device:
                self._by_device[device] = (self._U.to(device), self._E0.to(device))
            return self._by_device[device]

    def __repr__(self) -> str:
        return (
            f"SubspaceBasis(d_model={self.d_model}, k={self.k}, vocab={self.vocab_size}, "
            f"id={self.basis_id})"
        )
