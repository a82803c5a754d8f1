import hashlib
import time

import msgpack
import pytest
import torch

from shoal.peer.errors import AuthError, PayloadTooLarge, ProtocolError
from shoal.peer.wire import (
    H_MAC,
    H_TIME,
    H_VERSION,
    PreparedBody,
    WireCodec,
    pack_tensor,
    unpack_tensor,
)


def codec(key="secret", swarm="swarm-a", peer="p1", **kw):
    return WireCodec(peer, swarm, key, max_body_bytes=kw.pop("max_body_bytes", 1 << 20), **kw)


def test_round_trip_with_mac():
    a, b = codec(peer="a"), codec(peer="b")
    body, headers = a.encode("POST", "/gossip", {"x": 1, "blob": b"\x00\x01"})
    env = b.decode("POST", "/gossip", headers, body)
    assert (
        env.sender == "a"
        and env.swarm_id == "swarm-a"
        and env.payload == {"x": 1, "blob": b"\x00\x01"}
    )


def test_wrong_key_missing_mac_and_tampering_are_auth_errors():
    body, headers = codec(key="k1").encode("POST", "/gossip", {"x": 1})
    with pytest.raises(AuthError, match="HMAC"):
        codec(key="k2").decode("POST", "/gossip", headers, body)
    with pytest.raises(AuthError):
        codec(key="k1").decode(
            "POST", "/gossip", {k: v for k, v in headers.items() if k != H_MAC}, body
        )
    tampered = body[:-1] + bytes([body[-1] ^ 1])
    with pytest.raises(AuthError):
        codec(key="k1").decode("POST", "/gossip", headers, tampered)


def test_mac_binds_the_path():
    body, headers = codec().encode("POST", "/gossip", {"x": 1})
    with pytest.raises(AuthError):
        codec().decode("POST", "/join", headers, body)


def test_wrong_swarm_stale_time_and_version():
    body, headers = codec(key=None, swarm="other").encode("POST", "/gossip", {})
    with pytest.raises(AuthError, match="swarm"):
        codec(key=None).decode("POST", "/gossip", headers, body)
    assert (
        codec(key=None).decode("POST", "/gossip", headers, body, any_swarm=True).swarm_id == "other"
    )
    body, headers = codec(key=None).encode("POST", "/gossip", {})
    with pytest.raises(AuthError, match="timestamp"):
        codec(key=None).decode(
            "POST", "/gossip", {**headers, H_TIME: str(time.time() - 3600)}, body
        )
    with pytest.raises(ProtocolError, match="version"):
        codec(key=None).decode("POST", "/gossip", {**headers, H_VERSION: "99"}, body)


@pytest.mark.parametrize(
    "body", [b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({1: 2}), b""]
)
def test_malformed_bodies_are_protocol_errors(body):
    sender = codec(key=None)  # signs whatever body it is given, as a hostile peer could
    prepared = PreparedBody(body, "identity", hashlib.sha256(body).digest())
    headers = sender.headers("POST", "/gossip", prepared)
    with pytest.raises(ProtocolError):
        codec(key=None).decode("POST", "/gossip", headers, body)


def test_large_bodies_are_compressed_and_size_is_bounded():
    a = codec(compress_above_bytes=1024)
    payload = {"data": b"a" * 100_000}
    body, headers = a.encode("POST", "/gossip", payload)
    assert headers["X-Shoal-Encoding"] == "zstd" and len(body) < 10_000
    assert codec().decode("POST", "/gossip", headers, body).payload == payload
    with pytest.raises(PayloadTooLarge):
        codec(max_body_bytes=50_000).decode(
            "POST", "/gossip", headers, body
        )  # decompresses past the limit
    with pytest.raises(PayloadTooLarge):
        codec().decode("POST", "/gossip", headers, body, max_bytes=len(body) - 1)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8]
)
def test_tensor_round_trip(dtype):
    t = (torch.randn(3, 5) * 10).to(dtype)
    back = unpack_tensor(msgpack.unpackb(msgpack.packb(pack_tensor(t))), expected_shape=(3, 5))
    assert back.dtype == dtype and torch.equal(back, t)


def test_bad_tensors_are_rejected():
    good = pack_tensor(torch.zeros(2, 3))
    with pytest.raises(ProtocolError, match="dtype"):
        unpack_tensor({**good, "dtype": "object"})
    with pytest.raises(ProtocolError, match="bytes"):
        unpack_tensor({**good, "data": good["data"][:-1]})
    with pytest.raises(ProtocolError, match="expected"):
        unpack_tensor(good, expected_shape=(3, 2))
    with pytest.raises(ProtocolError, match="shape"):
        unpack_tensor({**good, "shape": [-1, 6]})
    with pytest.raises(ProtocolError):
        unpack_tensor({**good, "extra": 1})


def test_a_prepared_body_answers_many_requests():
    server, client = codec(peer="server"), codec(peer="client")
    body = server.prepare({"tensors": b"\x07" * 200_000})
    for _ in range(2):  # one body, a fresh envelope (time, MAC) per answer
        headers = server.headers("RESPONSE", "response:/round/contribution", body)
        env = client.decode("RESPONSE", "response:/round/contribution", headers, body.data)
        assert env.payload == {"tensors": b"\x07" * 200_000}
    headers = server.headers("RESPONSE", "response:/round/contribution", body)
    with pytest.raises(AuthError):  # the MAC covers the body through its digest
        client.decode("RESPONSE", "response:/round/contribution", headers, body.data[:-1] + b"\x00")
    with pytest.raises(AuthError):  # and the path
        client.decode("RESPONSE", "response:/round/set", headers, body.data)


def test_is_large_estimates_packed_size():
    wire = codec(compress_above_bytes=64 * 1024)
    assert not wire.is_large({"peers": [{"peer_id": "p" * 20, "round": 3}] * 50})
    assert wire.is_large({"round": 1, "tensors": {"w": b"\x00" * (64 * 1024)}})
    assert wire.is_large({"act": {"data": bytearray(70_000)}})


@pytest.mark.parametrize("size", [0, 255, 256, 65535, 65536, 70_000])
def test_parts_pack_to_exactly_what_msgpack_packs(size):
    from shoal.peer.wire import pack_parts

    payload = {
        "round": 3,
        "tensors": {"w": b"\x01" * size, "v": bytearray(b"\x02" * 300)},
        "list": [1, (2.5, None), {"k": "v"}],
        "flag": True,
    }
    parts = pack_parts(payload, big_bytes=256)
    assert b"".join(bytes(p) for p in parts) == msgpack.packb(payload, use_bin_type=True)
    if size >= 256:  # the big value is a part of its own, not a copy
        assert any(p is payload["tensors"]["w"] for p in parts)


def test_a_large_prepared_body_decodes_to_the_payload():
    wire = codec(compress_above_bytes=1024)
    payload = {"round": 1, "tensors": {f"t{i}": bytes([i]) * 5000 for i in range(4)}}
    body = wire.prepare(payload)
    assert body.encoding == "zstd"
    env = wire.decode("POST", "/x", wire.headers("POST", "/x", body), body.data)
    assert env.payload == payload
