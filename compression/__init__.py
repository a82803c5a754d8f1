"""shoal.compression: tensor codecs (bytes on the wire for pseudo-gradients) and framing.

    codec = get_codec("int8")                  # or "fp32", "fp16", "q4", "q2", "topk"
    payload = codec.encode(pseudo_grad)        # self-describing bytes
    tensor = codec.decode(payload, shape)      # float32, exactly `shape`, or CodecError

See base.py for the wire header and the validation every decode does.

Activation codecs (pipeline stages: the residual stream and its gradient, see activation.py):

    codec = get_activation_codec("int8")       # or "none", "subspace" (basis=SubspaceBasis)
    payload = codec.encode(h, token_ids)       # decode(payload, token_ids, d_model)
"""

from .activation import (
    ACTIVATION_CODECS,
    ActivationCodec,
    Int8ActivationCodec,
    RawActivationCodec,
    SubspaceActivationCodec,
    get_activation_codec,
)
from .base import Codec, CodecError
from .dense import Fp16Codec, Fp32Codec
from .framing import FrameTooLarge, zstd_frame, zstd_frame_parts, zstd_unframe
from .packing import (
    indices_12bit_nbytes,
    pack_bits,
    pack_indices_12bit,
    packed_nbytes,
    unpack_bits,
    unpack_indices_12bit,
)
from .quantize import Int8Codec, Q2Codec, Q4Codec, QuantizeCodec, dequantize_chunks, quantize_chunks
from .registry import CODECS, get_codec
from .subspace_basis import SubspaceBasis, subspace_dim_for_ratio, token_id_nbytes
from .topk import TopKCodec
from .topk_layout import ChunkLayout, chunk_layout

__all__ = [
    "ACTIVATION_CODECS",
    "ActivationCodec",
    "CODECS",
    "ChunkLayout",
    "Codec",
    "CodecError",
    "Fp16Codec",
    "Fp32Codec",
    "FrameTooLarge",
    "Int8ActivationCodec",
    "Int8Codec",
    "Q2Codec",
    "Q4Codec",
    "QuantizeCodec",
    "RawActivationCodec",
    "SubspaceActivationCodec",
    "SubspaceBasis",
    "TopKCodec",
    "chunk_layout",
    "dequantize_chunks",
    "get_activation_codec",
    "get_codec",
    "indices_12bit_nbytes",
    "pack_bits",
    "pack_indices_12bit",
    "packed_nbytes",
    "quantize_chunks",
    "subspace_dim_for_ratio",
    "token_id_nbytes",
    "unpack_bits",
    "unpack_indices_12bit",
    "zstd_frame",
    "zstd_frame_parts",
    "zstd_unframe",
]
