import pytest
import torch

from shoal.peer.errors import ProtocolError
from shoal.peer.statesync import parse_state, serialize_state

SHAPES = {"outer/w": (4, 3), "momentum/w": (4, 3)}


def state():
    return {"outer/w": torch.randn(4, 3), "momentum/w": torch.randn(4, 3)}


def test_round_trip_in_chunks():
    original = state()
    blob = serialize_state(7, original, {"peer": "a"}, chunk_bytes=64)
    assert blob.num_chunks > 1
    data = b"".join(blob.chunk(i) for i in range(blob.num_chunks))
    round_id, tensors, meta = parse_state(data, SHAPES)
    assert round_id == 7 and meta == {"peer": "a"}
    assert all(torch.equal(tensors[n], original[n]) for n in SHAPES)
    with pytest.raises(ProtocolError):
        blob.chunk(blob.num_chunks)


def test_rejects_garbage_wrong_shapes_and_nan():
    with pytest.raises(ProtocolError, match="unreadable"):
        parse_state(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", SHAPES)
    with pytest.raises(ProtocolError):
        parse_state(
            serialize_state(1, state(), {}, 1 << 20).data, {"outer/w": (3, 4), "momentum/w": (4, 3)}
        )
    with pytest.raises(ProtocolError):
        parse_state(serialize_state(1, {"outer/w": torch.randn(4, 3)}, {}, 1 << 20).data, SHAPES)
    bad = state()
    bad["outer/w"][0, 0] = float("nan")
    with pytest.raises(ProtocolError, match="non-finite"):
        parse_state(serialize_state(1, bad, {}, 1 << 20).data, SHAPES)


def test_a_second_snapshot_of_a_round_replaces_the_first():
    # a stage-1 peer re-offers its round's state once it holds stage 0's copy: downloads
    # of the first snapshot get Gone for their next chunk and start over
    import asyncio

    from shoal.peer.errors import Gone
    from shoal.peer.statesync import StateServer

    async def main():
        server = StateServer(chunk_bytes=64)
        first = state()
        server.update(3, first, {})
        old = await server.latest()
        assert old is await server.latest()  # serialized once per snapshot
        extra = {**first, "stage0/outer/e": torch.ones(2)}
        server.update(3, extra, {})
        with pytest.raises(Gone):
            server.blob(3)
        new = await server.latest()
        _, tensors, _ = parse_state(
            b"".join(new.chunk(i) for i in range(new.num_chunks)),
            {**SHAPES, "stage0/outer/e": (2,)},
        )
        assert torch.equal(tensors["stage0/outer/e"], torch.ones(2)) and server.blob(3) is new

    asyncio.run(main())


def test_the_blob_is_safetensors_and_its_chunks_cut_across_tensors():
    from safetensors.torch import load

    tensors = {
        "outer/w": torch.randn(3, 5),
        "momentum/w": torch.randn(5, 3),
        "scalar": torch.tensor(2.0),
        "half": torch.randn(4).half(),
        "empty": torch.zeros(0),
    }
    blob = serialize_state(3, tensors, {"peer": "p"}, chunk_bytes=7)
    loaded = load(blob.data)
    assert all(torch.equal(loaded[name], t) for name, t in tensors.items())
    assert b"".join(blob.chunk(i) for i in range(blob.num_chunks)) == blob.data
    assert blob.manifest()["size"] == len(blob.data) and blob.num_chunks == -(-len(blob.data) // 7)
