"""Codecs by name, so a run's config (`--codec int8`) picks one without importing it.

A new codec is a new file plus one line here (STYLE.md rule 2).
"""

from __future__ import annotations

from typing import Any

from .base import Codec
from .dense import Fp16Codec, Fp32Codec
from .quantize import Int8Codec, Q2Codec, Q4Codec
from .topk import TopKCodec

CODECS: dict[str, type[Codec]] = {
    codec.name: codec for codec in (Fp32Codec, Fp16Codec, Int8Codec, Q4Codec, Q2Codec, TopKCodec)
}


def get_codec(name: str, **options: Any) -> Codec:
    """A codec instance by registry name, e.g. `get_codec("int8", chunk_size=4096)`.

    Raises ValueError naming the known codecs for an unknown name, TypeError for an option
    the codec does not take."""
    try:
        codec_class = CODECS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown codec {name!r}; known codecs: {', '.join(sorted(CODECS))}"
        ) from None
    try:
        return codec_class(**options)
    except TypeError as exc:
        raise TypeError(f"codec {name!r} does not take options {sorted(options)}: {exc}") from None
