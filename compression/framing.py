"""zstd framing for large byte strings (codec payloads, HTTP bodies in `peer/wire.py`).

A frame is one flag byte, then the data: flag 0 = stored as is, flag 1 = one zstd frame.
`zstd_frame` compresses only when that makes the result smaller, so incompressible data
(quantizer codes are close to random) costs exactly one extra byte and no decompression
work on the receiver. `zstd_unframe` is written for bytes from strangers: it refuses a
frame whose declared or actual size exceeds the caller's limit before allocating it (a zip
bomb), and refuses truncated frames, trailing bytes and unknown flags. Compressed frames
carry zstd's content checksum (4 bytes), so corruption is caught even where `peer/wire.py`
runs without a MAC; stored frames have no checksum (their contents, e.g. codec payloads,
carry their own).
"""

from __future__ import annotations

import threading

import zstandard

from .base import CodecError, payload_bytes

FLAG_RAW = 0
FLAG_ZSTD = 1


class FrameTooLarge(CodecError):
    """A well-formed frame whose content exceeds the receiver's limit (an HTTP layer maps
    this to 413, other CodecErrors to 400)."""

    def __init__(self, size: int, limit: int, what: str) -> None:
        super().__init__(f"{what} holds {size} bytes, over the {limit}-byte limit")
        self.size = size
        self.limit = limit


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """A compressor per thread and level (they are not thread-safe; building one costs
    about as much as compressing a few KB)."""
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        # the declared content size (written by default) lets the receiver check the size
        # before allocating; the content checksum catches corruption where no MAC is set
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return cache[level]


def zstd_frame(data: bytes, level: int = 3, min_size: int = 1024) -> bytes:
    """Flag byte + data, zstd-compressed at `level` if `data` is at least `min_size` bytes
    and compression makes it smaller; otherwise stored (len(data) + 1 bytes)."""
    raw = bytes(payload_bytes(data))
    if len(raw) >= min_size:
        compressed = _compressor(level).compress(raw)
        if len(compressed) < len(raw):
            return bytes((FLAG_ZSTD,)) + compressed
    return bytes((FLAG_RAW,)) + raw


def zstd_frame_parts(
    parts: list, level: int = 3, min_size: int = 1024, step_bytes: int = 1 << 20
) -> bytes:
    """`zstd_frame` of the concatenation of `parts` (bytes-like), without concatenating them
    first: the parts are fed to one zstd stream `step_bytes` at a time, so no single call
    holds the interpreter long (the caller may be an executor thread beside an event loop).
    The frame has the same form as `zstd_frame`'s (flag byte, declared content size,
    checksum) and unframes to the same bytes; streamed, zstd may choose slightly different
    blocks, so the compressed bytes need not equal a one-shot compression's."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(len(v) for v in views)
    if total >= min_size:
        stream = _compressor(level).compressobj(size=total)
        out = [bytes((FLAG_ZSTD,))]
        for view in views:
            for start in range(0, len(view), step_bytes):
                out.append(stream.compress(view[start : start + step_bytes]))
        out.append(stream.flush())
        if sum(map(len, out)) - 1 < total:
            return b"".join(out)
    return b"".join([bytes((FLAG_RAW,)), *views])


def zstd_unframe(data: bytes, max_size: int) -> bytes:
    """Inverse of `zstd_frame`. Raises FrameTooLarge if the content would exceed `max_size`
    bytes, CodecError if the frame is malformed (including zstd frames that do not declare
    their content size: `zstd_frame` always writes it, and without it the size could only be
    bounded by decompressing)."""
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
        raise ValueError(f"max_size must be a non-negative int, got {max_size!r}")
    view = payload_bytes(data)
    if len(view) == 0:
        raise CodecError("empty frame: missing the flag byte")
    flag, body = view[0], view[1:]
    if flag == FLAG_RAW:
        if len(body) > max_size:
            raise FrameTooLarge(len(body), max_size, "stored frame")
        return bytes(body)
    if flag != FLAG_ZSTD:
        raise CodecError(f"unknown frame flag {flag} (want {FLAG_RAW} or {FLAG_ZSTD})")
    try:
        declared = zstandard.get_frame_parameters(body).content_size
    except zstandard.ZstdError as exc:
        raise CodecError(f"bad zstd frame header: {exc}") from None
    if declared in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise CodecError("zstd frame does not declare its content size")
    # python-zstandard allocates the declared size up front: a bomb must stop here
    if declared > max_size:
        raise FrameTooLarge(declared, max_size, "zstd frame")
    try:
        # content larger than declared, truncation and trailing bytes are all ZstdErrors
        return zstandard.ZstdDecompressor().decompress(body, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"bad zstd frame: {exc}") from None
