"""Unpacking a large msgpack body a value at a time.

`msgpack.unpackb` copies every binary value of a body in one C call that holds the
interpreter throughout: for a 124 MB contribution that is tens of milliseconds in which
no other thread (the event loop's included) runs. `unpack_large` walks the containers in
Python and copies each binary value by itself, so the interpreter can switch threads
between values, and hands the small scalars to msgpack. It accepts what
`msgpack.unpackb(raw, raw=False, strict_map_key=True)` accepts, with the same result, but
refuses ext types (peers never send them) and nesting deeper than `MAX_DEPTH`.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

MAX_DEPTH = 32


class MalformedBody(ValueError):
    """Not a msgpack value this parser accepts."""


# first byte → total bytes of a fixed-size scalar (nil, bools, floats, ints)
_FIXED_SCALARS = {
    0xC0: 1,
    0xC2: 1,
    0xC3: 1,
    0xCA: 5,
    0xCB: 9,
    0xCC: 2,
    0xCD: 3,
    0xCE: 5,
    0xCF: 9,
    0xD0: 2,
    0xD1: 3,
    0xD2: 5,
    0xD3: 9,
}
_SIZED = {  # byte → (kind, bytes of the size field)
    0xC4: ("bin", 1),
    0xC5: ("bin", 2),
    0xC6: ("bin", 4),
    0xD9: ("str", 1),
    0xDA: ("str", 2),
    0xDB: ("str", 4),
    0xDC: ("array", 2),
    0xDD: ("array", 4),
    0xDE: ("map", 2),
    0xDF: ("map", 4),
}


def unpack_large(raw: bytes) -> Any:
    view = memoryview(raw)
    value, end = _value(view, 0, 0)
    if end != len(view):
        raise MalformedBody(f"{len(view) - end} bytes after the value")
    return value


def _head(view: memoryview, pos: int) -> tuple[str, int, int]:
    """(kind, size or count, position after the head) of the value at `pos`."""
    if pos >= len(view):
        raise MalformedBody("truncated")
    byte = view[pos]
    if byte <= 0x7F or byte >= 0xE0:
        return "scalar", 1, pos
    if 0x80 <= byte <= 0x8F:
        return "map", byte & 0x0F, pos + 1
    if 0x90 <= byte <= 0x9F:
        return "array", byte & 0x0F, pos + 1
    if 0xA0 <= byte <= 0xBF:
        return "scalar", 1 + (byte & 0x1F), pos
    if byte in _FIXED_SCALARS:
        return "scalar", _FIXED_SCALARS[byte], pos
    if byte in _SIZED:
        kind, width = _SIZED[byte]
        if pos + 1 + width > len(view):
            raise MalformedBody("truncated")
        size = int.from_bytes(view[pos + 1 : pos + 1 + width], "big")
        if kind == "str":
            return "scalar", 1 + width + size, pos
        return kind, size, pos + 1 + width
    raise MalformedBody(f"unsupported msgpack type byte 0x{byte:02x}")


def _value(view: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise MalformedBody(f"nested deeper than {MAX_DEPTH}")
    kind, size, pos = _head(view, pos)
    remaining = len(view) - pos
    if kind == "scalar":
        if size > remaining:
            raise MalformedBody("truncated")
        try:
            return msgpack.unpackb(view[pos : pos + size], raw=False), pos + size
        except (ValueError, msgpack.UnpackException, struct.error) as exc:
            raise MalformedBody(str(exc)) from None
    if kind == "bin":
        if size > remaining:
            raise MalformedBody("truncated")
        return bytes(view[pos : pos + size]), pos + size
    if size > remaining:  # every element takes at least a byte
        raise MalformedBody("truncated")
    if kind == "array":
        items = []
        for _ in range(size):
            item, pos = _value(view, pos, depth + 1)
            items.append(item)
        return items, pos
    mapping: dict[Any, Any] = {}
    for _ in range(size):
        key, pos = _value(view, pos, depth + 1)
        if not isinstance(key, (str, bytes)):
            raise MalformedBody(f"map key of type {type(key).__name__}")
        mapping[key], pos = _value(view, pos, depth + 1)
    return mapping, pos
