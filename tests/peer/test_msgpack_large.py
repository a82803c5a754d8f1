"""unpack_large gives what msgpack.unpackb gives, or refuses what it cannot vouch for."""

import random

import msgpack
import pytest

from shoal.peer.msgpack_large import MAX_DEPTH, MalformedBody, unpack_large

PAYLOADS = [
    {
        "round": 3,
        "peer": "p",
        "tensors": {"w": b"\x01" * 70_000, "b": b"", "v": bytes(range(256)) * 300},
    },
    {
        "ints": [
            0,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            2**32,
            2**63 - 1,
            -1,
            -32,
            -33,
            -129,
            -(2**31),
            -(2**63),
        ]
    },
    {"floats": [0.5, -1e300, float("inf")], "none": None, "flags": [True, False], "f32": 1.0},
    {
        "s": "",
        "t": "x" * 31,
        "u": "y" * 32,
        "v": "z" * 300,
        "w": "é" * 70_000,
        "n": {"deep": [[{"a": []}]]},
    },
    {"list16": list(range(20)), "map16": {str(i): i for i in range(20)}, "bin16": b"b" * 300},
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_same_values_as_unpackb(payload):
    raw = msgpack.packb(payload, use_bin_type=True)
    assert unpack_large(raw) == msgpack.unpackb(raw, raw=False, strict_map_key=True)


def test_single_precision_floats_match():
    raw = msgpack.packb({"x": 1.5}, use_single_float=True)
    assert unpack_large(raw) == msgpack.unpackb(raw, raw=False)


def test_corrupted_bodies_are_refused_or_read_alike():
    rng = random.Random(0)
    base = bytearray(msgpack.packb(PAYLOADS[0] | PAYLOADS[1] | PAYLOADS[3], use_bin_type=True))
    for _ in range(1500):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(len(raw))]
        try:
            expected = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True)
        except Exception:
            expected = MalformedBody
        try:
            got = unpack_large(bytes(raw))
        except MalformedBody:
            got = MalformedBody
        if got is not MalformedBody:  # what it reads, msgpack reads the same way
            assert got == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x81",
        b"\xc6\x00\x00\x10\x00abc",
        b"\xdf\xff\xff\xff\xff",
        b"\x81\x01\x02",
        b"\xc1",
        b"\xd4\x01\x02",
        msgpack.packb({"a": 1}) + b"\x00",
        b"\x91" * (MAX_DEPTH + 2) + b"\x00",
    ],
)
def test_malformed_bodies_are_refused(raw):
    with pytest.raises(MalformedBody):
        unpack_large(raw)
