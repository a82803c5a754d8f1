"""The codec interface: a tensor becomes self-describing bytes, and bytes from an untrusted
peer become a tensor only if every part of them checks out.

Shaped after hivemind's `compression/base.py` (one small abstract class, one file per codec,
a registry keyed by name), with two differences that matter in an open swarm:

* `decode` takes the shape the *receiver* expects (the model's parameter shape). A payload
  is accepted only if it describes exactly that many elements, so a peer cannot make us
  allocate from a lying header or hand the outer optimizer a tensor of the wrong size.
* Every payload carries a CRC32. The HMAC in `peer/wire.py` is optional (no swarm secret,
  no MAC), and a flipped bit in a pseudo-gradient would otherwise be averaged silently
  into every replica. The CRC stops accidents only; a malicious peer can recompute it, which
  is why each codec still validates its structure (lengths, tables, padding) on its own.

Wire layout shared by all codecs (little-endian, `HEADER`, 15 bytes):

    magic u8 (0x5C) | codec id u8 | version u8 | element count u64 | crc32 u32 | body ...

The CRC covers the first 11 header bytes and the body. What the body holds is up to each
codec (`dense.py`, `quantize.py`). `seal` and `open_header`/`check_crc` write and check this
framing for any header that starts with magic, codec id and version and ends with the CRC:
the activation codecs' (`activation_base.py`) is the other one.
"""

from __future__ import annotations

import math
import struct
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch

MAGIC = 0x5C
HEADER = struct.Struct("<BBBQI")  # magic, codec id, version, element count, crc32
Body = bytes | Sequence[bytes | bytearray | memoryview | np.ndarray]  # see `seal`
_CRC_OFFSET = HEADER.size - 4

# codec id -> name, filled as codec classes are defined; used to name the codec a payload
# really came from when it reaches the wrong decoder. Tensor codecs (`Codec`) and activation
# codecs (`activation.py`) share this one namespace, so their payloads never look alike.
_NAME_BY_ID: dict[int, str] = {}


def register_codec_id(codec_id: int, name: str) -> None:
    """Claim the wire byte `codec_id` for the codec `name`; TypeError if another codec has it."""
    taken = _NAME_BY_ID.get(codec_id)
    if taken is not None and taken != name:
        raise TypeError(f"codec id {codec_id} of {name!r} is taken by {taken!r}")
    _NAME_BY_ID[codec_id] = name


def codec_name(codec_id: int) -> str:
    """The name of the codec that owns `codec_id`, for error messages."""
    return _NAME_BY_ID.get(codec_id, f"unknown codec id {codec_id}")


class CodecError(ValueError):
    """A payload (or a tensor to encode) that fails validation; the message says what is wrong.

    Subclasses ValueError so callers that only know "bad input" still catch it; `optim/`
    maps it to a rejected contribution and `peer/` to a 4xx response.
    """


def payload_bytes(payload: object) -> memoryview:
    """A flat byte view of a bytes-like payload, or CodecError for anything else."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    view = memoryview(payload)
    if not view.c_contiguous:
        raise CodecError("payload must be a contiguous byte buffer")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def seal(header: struct.Struct, fields: Sequence[int], body: Body) -> bytes:
    """A payload: `header` packed from `fields` and a CRC32, its last field (u32), over the
    header's other bytes and `body`; then `body` (bytes, or bytes-like parts to concatenate:
    they are copied once, here)."""
    parts = [body] if isinstance(body, bytes | bytearray | memoryview) else list(body)
    prefix = header.pack(*fields, 0)[: header.size - 4]
    crc = zlib.crc32(prefix)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join((prefix, struct.pack("<I", crc), *parts))


def open_header(
    payload: object, header: struct.Struct, codec_id: int, version: int, name: str
) -> tuple[memoryview, tuple[int, ...]]:
    """(the payload as bytes, its header fields after magic, codec id and version, the CRC
    last) once the checks every codec makes first pass: bytes at least a header long, with
    shoal's magic byte, `codec_id` and `version`. CodecError (naming `name`) otherwise."""
    data = payload_bytes(payload)
    if len(data) < header.size:
        raise CodecError(
            f"payload is {len(data)} bytes, shorter than the {header.size}-byte header"
        )
    magic, sent_id, sent_version, *fields = header.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(
            f"bad magic byte 0x{magic:02x} (want 0x{MAGIC:02x}): not a shoal codec payload"
        )
    if sent_id != codec_id:
        raise CodecError(
            f"payload was encoded by {codec_name(sent_id)!r}, not {codec_name(codec_id)!r}"
        )
    if sent_version != version:
        raise CodecError(f"{name} payload version {sent_version} is not supported (want {version})")
    return data, tuple(fields)


def check_crc(data: memoryview, header: struct.Struct, crc: int, name: str) -> memoryview:
    """The body after `header` if `crc` (the header's) matches it; CodecError otherwise."""
    body = data[header.size :]
    if zlib.crc32(body, zlib.crc32(data[: header.size - 4])) != crc:
        raise CodecError(f"{name} payload fails its CRC32 check (corrupted in transit?)")
    return body


def normalize_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """`shape` (a tuple, list or torch.Size of non-negative ints) as a tuple of ints."""
    dims = tuple(shape)
    if not all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 0 for d in dims
    ):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def as_float32_values(tensor: torch.Tensor) -> np.ndarray:
    """Flat, contiguous float32 numpy view/copy of a floating-point tensor; CodecError if it
    holds NaN/Inf (or values beyond float32 range, which become Inf in the cast)."""
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise CodecError(f"expected a floating-point tensor, got dtype {tensor.dtype}")
    values = tensor.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy()
    if not np.isfinite(values).all():
        bad = int(values.size - np.isfinite(values).sum())
        raise CodecError(f"tensor holds {bad} NaN/Inf value(s) (or values beyond float32 range)")
    return values


class Codec(ABC):
    """Turns a float tensor into bytes and back; stateless, so safe to share between threads.

    Subclasses set `name` (registry key), `codec_id` (unique byte on the wire) and implement
    `_encode_values`, `_decode_values` and `_body_nbytes`. The public methods do the shared
    work: dtype/finiteness checks on encode; magic, codec id, version, element count and CRC
    checks on decode, plus a final finiteness check so no codec can return NaN/Inf.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "codec_id" in cls.__dict__:
            register_codec_id(cls.codec_id, cls.name)

    def encode(self, tensor: torch.Tensor) -> bytes:
        """Encode a floating-point tensor (any shape, any device) into a payload."""
        values = as_float32_values(tensor)
        body = self._encode_values(values)
        return seal(HEADER, (MAGIC, self.codec_id, self.version, values.size), body)

    def decode(self, payload: bytes, shape: Sequence[int]) -> torch.Tensor:
        """Decode a payload into a float32 CPU tensor of exactly `shape`, or raise CodecError."""
        dims = normalize_shape(shape)
        count = math.prod(dims)
        body = self._read_header(payload, count)
        values = self._decode_values(body, count)
        if values.dtype != np.float32 or values.shape != (count,):  # a codec bug, not bad input
            raise AssertionError(
                f"{self.name}: decoded {values.dtype}{values.shape}, want ({count},)"
            )
        if not np.isfinite(values).all():
            raise CodecError(f"{self.name} payload decodes to non-finite values")
        return torch.from_numpy(values).reshape(dims)

    def nbytes(self, payload: bytes) -> int:
        """Exact wire size of an encoded payload, in bytes."""
        return len(payload)

    def payload_nbytes(self, count: int) -> int:
        """Exact size `encode` produces for a tensor of `count` elements (for budgets/limits)."""
        return HEADER.size + self._body_nbytes(count)

    def _read_header(self, payload: bytes, count: int) -> memoryview:
        """Check the shared header and CRC; return the body."""
        data, (declared, crc) = open_header(payload, HEADER, self.codec_id, self.version, self.name)
        if declared != count:
            raise CodecError(
                f"payload holds {declared} elements, but the expected shape has {count}"
            )
        return check_crc(data, HEADER, crc, self.name)

    @abstractmethod
    def _encode_values(self, values: np.ndarray) -> Body:
        """Body bytes for a flat, finite float32 array (or its consecutive parts, any
        bytes-like objects: `seal` joins them, saving a copy of a large body)."""

    @abstractmethod
    def _decode_values(self, body: memoryview, count: int) -> np.ndarray:
        """Flat float32 array of `count` elements from a CRC-checked body; CodecError if the
        body is not exactly what `count` elements need. Must check lengths before allocating."""

    @abstractmethod
    def _body_nbytes(self, count: int) -> int:
        """Exact body size `_encode_values` produces for `count` elements."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
