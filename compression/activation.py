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

plus `header_nbytes` per payload: 24, 33 for subspace, 32 for subspace-int8 and 32 + 2·k
for subspace-int4. At d_model = 128: 512, 132 and (k = 31, ratio 8) 62 bytes per token.

The interface and wire header are `activation_base.py`; each codec is its own file
(`activation_raw.py`, `activation_int8.py`, `activation_subspace.py`,
`activation_subspace_int8.py`, `activation_subspace_int4.py`); this file is the registry.
A new codec is a new file plus one line in `ACTIVATION_CODECS` (STYLE.md rule 2).
"""

from __future__ import annotations

import inspect
from typing import Any

from .activation_base import ACTIVATION_HEADER, BACKWARD, FORWARD, ActivationCodec
from .activation_int8 import Int8ActivationCodec
from .activation_raw import RawActivationCodec
from .activation_subspace import SubspaceActivationCodec
from .activation_subspace_int4 import SubspaceInt4ActivationCodec
from .activation_subspace_int8 import SubspaceInt8ActivationCodec

__all__ = [
    "ACTIVATION_CODECS",
    "ACTIVATION_HEADER",
    "BACKWARD",
    "FORWARD",
    "ActivationCodec",
    "Int8ActivationCodec",
    "RawActivationCodec",
    "SubspaceActivationCodec",
    "SubspaceInt4ActivationCodec",
    "SubspaceInt8ActivationCodec",
    "get_activation_codec",
]

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
