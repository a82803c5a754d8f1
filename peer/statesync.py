"""State sync: how a joiner (or a drifted peer) gets the current outer state.

Protocol:
- `POST /state/manifest {}` → {round, size, sha256, chunk_bytes, num_chunks}: the serving
  peer freezes its latest outer state (weights + outer optimizer state) as one safetensors
  blob, built once per round and kept for the last two rounds.
- `POST /state/chunk {round, index}` → {data}: one chunk of that blob; 410 Gone if the
  round has been replaced meanwhile, and the joiner starts over from the manifest.
- The joiner checks the blob's sha256 against the manifest, parses it with safetensors
  (no pickle), and checks every tensor's name and shape against its own model before
  using any of it. A peer that vanishes mid-transfer costs a retry from another peer.

Byte work (serializing a snapshot, joining and hashing a download, parsing it) runs in the
default executor; a manifest request waits at most `serve_timeout_s` for its blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load as safetensors_load

from shoal.peer.client import PeerClient
from shoal.peer.errors import Gone, ProtocolError, ShoalError
from shoal.peer.membership import PeerInfo

log = logging.getLogger(__name__)

MANIFEST_SOURCES = 8  # sources a download asks for their manifest, chosen at random
CHUNKS_IN_FLIGHT = 4  # chunk requests of one download at a time


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
}


@dataclass(frozen=True)
class StateBlob:
    """One snapshot in the safetensors format, kept as parts: the header, then each
    tensor's own memory (the snapshot is frozen), never joined into one copy. Chunks are
    cut across the parts on request."""

    round_id: int
    parts: tuple[memoryview, ...]
    sha256: str
    chunk_bytes: int

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def num_chunks(self) -> int:
        return max(1, -(-self.size // self.chunk_bytes))

    @property
    def data(self) -> bytes:
        """The whole blob in one piece (tests; the server sends chunks)."""
        return b"".join(self.parts)

    def manifest(self) -> dict:
        return {
            "round": self.round_id,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_bytes": self.chunk_bytes,
            "num_chunks": self.num_chunks,
        }

    def chunk(self, index: int) -> bytes:
        if not 0 <= index < self.num_chunks:
            raise ProtocolError(f"chunk index {index} out of range 0..{self.num_chunks - 1}")
        begin, end = index * self.chunk_bytes, (index + 1) * self.chunk_bytes
        pieces, offset = [], 0
        for part in self.parts:
            if offset >= end:
                break
            if offset + len(part) > begin:
                pieces.append(part[max(0, begin - offset) : end - offset])
            offset += len(part)
        return b"".join(pieces)


def serialize_state(
    round_id: int,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, object],
    chunk_bytes: int,
) -> StateBlob:
    """The safetensors form of `tensors` (what `safetensors.torch.save` writes, readable by
    `safetensors.torch.load`), built from the tensors' own memory: no copy of the whole
    state, and no single long call holding the interpreter (hashing releases it)."""
    header: dict[str, object] = {
        "__metadata__": {"round": str(round_id), "meta": json.dumps(dict(metadata), sort_keys=True)}
    }
    buffers, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"state tensor {name} has dtype {tensor.dtype}, which is not served")
        raw = (
            memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if tensor.numel()
            else memoryview(b"")
        )
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        buffers.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    parts = (memoryview(len(head).to_bytes(8, "little") + head), *buffers)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return StateBlob(round_id, parts, digest.hexdigest(), chunk_bytes)


def parse_state(
    data: bytes, expected_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Parse a state blob and check it against the expected tensor names and shapes."""
    try:
        tensors = safetensors_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = header.get("__metadata__", {})
        round_id = int(meta["round"])
        extra = json.loads(meta.get("meta", "{}"))
    except Exception as exc:  # safetensors raises its own error types on garbage
        raise ProtocolError(f"unreadable state blob: {type(exc).__name__}: {exc}") from None
    missing = set(expected_shapes) - set(tensors)
    if missing:  # more is fine: a stage peer takes its slice of a full replica's state
        raise ProtocolError(
            f"state lacks {len(missing)} expected tensors, e.g. {sorted(missing)[:3]}"
        )
    tensors = {name: tensors[name] for name in expected_shapes}
    for name, shape in expected_shapes.items():
        if tuple(tensors[name].shape) != tuple(shape) or tensors[name].dtype != torch.float32:
            raise ProtocolError(
                f"state tensor {name}: {tuple(tensors[name].shape)} {tensors[name].dtype}, "
                f"expected {shape} float32"
            )
        if not torch.isfinite(tensors[name]).all():
            raise ProtocolError(f"state tensor {name} holds non-finite values")
    return round_id, tensors, extra


class StateServer:
    """Holds the latest frozen outer state and serves it in chunks."""

    def __init__(self, chunk_bytes: int, serve_timeout_s: float = 120.0) -> None:
        self.chunk_bytes = chunk_bytes
        self.serve_timeout_s = serve_timeout_s
        self._source: tuple[int, dict[str, torch.Tensor], dict] | None = None
        self._blobs: dict[int, StateBlob] = {}
        self._lock = asyncio.Lock()

    def update(self, round_id: int, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        """Offer a new snapshot (tensors must not be mutated afterwards). A second snapshot
        of the same round replaces the first: a download of the first gets Gone for its
        next chunk and starts over from the manifest."""
        self._source = (round_id, tensors, metadata)
        self._blobs.pop(round_id, None)

    async def latest(self) -> StateBlob:
        """The blob of the newest snapshot, serialized once (in the executor). Snapshots
        replaced while one serializes make it start over with the newest, until
        `serve_timeout_s`: then Gone, and the requester asks again or another peer."""
        if self._source is None:
            raise Gone("no state to serve yet")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.serve_timeout_s
        async with self._lock:
            while loop.time() < deadline:
                source = self._source
                round_id, tensors, metadata = source
                if round_id in self._blobs:
                    return self._blobs[round_id]
                blob = await loop.run_in_executor(
                    None, serialize_state, round_id, tensors, metadata, self.chunk_bytes
                )
                if self._source is source:  # else replaced meanwhile: serialize the new one
                    self._blobs[round_id] = blob
                    for old in sorted(self._blobs)[:-2]:
                        del self._blobs[old]
        raise Gone(f"the state kept changing for {self.serve_timeout_s:.0f} s; ask again")

    def blob(self, round_id: int) -> StateBlob:
        if round_id not in self._blobs:
            raise Gone(f"state of round {round_id} is no longer served; fetch the manifest again")
        return self._blobs[round_id]


StateCheck = Callable[[int, Mapping[str, torch.Tensor]], Awaitable[str | None]]


async def download_state(
    client: PeerClient,
    sources: Sequence[PeerInfo],
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    attempts: int = 3,
    on_progress: Callable[[int, int], None] | None = None,
    check: StateCheck | None = None,
    min_round: int = 0,
    min_round_wait_s: float = 0.0,
) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Download, verify and parse the outer state, its chunks spread over every source that
    serves the same blob (`_download_spread`); `attempts` rounds of trying all sources.
    `check(round, tensors)` may refuse a state that passed its own hash check (e.g. one whose
    weights hash is not the majority's) with a reason: the peers that served it are not
    asked again. Sources that still serve a state older than `min_round` are waited for,
    up to `min_round_wait_s` (a resync right after a vote: the majority publishes its new
    state once its own vote ends)."""
    errors: list[str] = []
    remaining = list(sources)
    loop = asyncio.get_running_loop()
    patience = loop.time() + min_round_wait_s
    attempt = 0
    while attempt < attempts:
        try:
            round_id, tensors, metadata, served_by = await _download_spread(
                client, remaining, expected_shapes, on_progress, min_round
            )
            problem = None if check is None else await check(round_id, tensors)
            if problem is None:
                return round_id, tensors, metadata
            errors.append(f"round {round_id} from {','.join(served_by)} refused: {problem}")
            log.warning("state download refused (attempt %d): %s", attempt + 1, errors[-1])
            remaining = [s for s in remaining if s.peer_id not in served_by]
        except NotYet as exc:
            if loop.time() < patience:
                await asyncio.sleep(0.5)
                continue  # not an attempt: the sources are fine, only behind
            errors.append(str(exc))
        except ShoalError as exc:
            errors.append(str(exc))
            log.warning("state download failed (attempt %d): %s", attempt + 1, exc)
        attempt += 1
        if not remaining:
            break
        if attempt < attempts:
            await asyncio.sleep(0.5 * attempt)
    raise ShoalError("could not download the outer state: " + "; ".join(errors[-4:]))


@dataclass(frozen=True)
class _Manifest:
    round_id: int
    size: int
    sha256: str
    num_chunks: int


async def _manifest(client: PeerClient, source: PeerInfo) -> _Manifest:
    manifest = (await client.call(source.address, "POST", "/state/manifest", {})).payload
    try:
        found = _Manifest(*(manifest[k] for k in ("round", "size", "sha256", "num_chunks")))
        assert (
            isinstance(found.round_id, int)
            and isinstance(found.size, int)
            and isinstance(found.num_chunks, int)
            and isinstance(found.sha256, str)
            and 0 < found.num_chunks <= 1 << 20
        )
    except (KeyError, AssertionError, TypeError):
        raise ProtocolError(f"bad state manifest from {source.peer_id}") from None
    if found.size > client.max_response_bytes:
        raise ProtocolError(
            f"state of {found.size} bytes exceeds the {client.max_response_bytes}-byte limit"
        )
    return found


class NotYet(ShoalError):
    """Every source that answered still serves a state older than the one asked for."""


async def _download_spread(
    client: PeerClient, sources: Sequence[PeerInfo], expected_shapes, on_progress, min_round=0
) -> tuple[int, dict[str, torch.Tensor], dict, list[str]]:
    """Ask up to MANIFEST_SOURCES sources for their manifest; among those serving the newest
    round's blob (the same sha256: replicas in step serve byte-identical blobs), fetch chunk
    i from holder (i + a random offset) mod H, CHUNKS_IN_FLIGHT at a time, so that joiners
    arriving together spread over the swarm instead of all pulling from one peer. A holder
    that fails a chunk is dropped and the chunk asked of the next one."""
    if not sources:
        raise ShoalError("no peer to download the state from")
    asked = random.sample(list(sources), min(len(sources), MANIFEST_SOURCES))
    answers = await asyncio.gather(*(_manifest(client, s) for s in asked), return_exceptions=True)
    failures = [f"{s.peer_id}: {a}" for s, a in zip(asked, answers, strict=True) if _failed(a)]
    served = [(s, a) for s, a in zip(asked, answers, strict=True) if not _failed(a)]
    if not served:
        raise ShoalError("; ".join(failures[-4:]))
    groups: dict[_Manifest, list[PeerInfo]] = {}
    for source, manifest in served:
        groups.setdefault(manifest, []).append(source)
    manifest, holders = max(groups.items(), key=lambda kv: (kv[0].round_id, len(kv[1])))
    if manifest.round_id < min_round:
        raise NotYet(f"the sources serve round {manifest.round_id}, not yet {min_round}")
    offset = random.randrange(len(holders))
    parts: list[bytes | None] = [None] * manifest.num_chunks
    gate = asyncio.Semaphore(CHUNKS_IN_FLIGHT)
    done = 0

    async def fetch(index: int) -> None:
        nonlocal done
        async with gate:
            for turn in range(len(holders)):
                if not holders:
                    break
                holder = holders[(index + offset + turn) % len(holders)]
                try:
                    parts[index] = await _chunk(client, holder, manifest.round_id, index)
                    break
                except ShoalError as exc:
                    failures.append(f"{holder.peer_id}: {exc}")
                    if holder in holders:
                        holders.remove(holder)
            if parts[index] is None:
                raise ShoalError(f"no holder delivered chunk {index}: {'; '.join(failures[-3:])}")
            done += 1
            if on_progress is not None:
                on_progress(done, manifest.num_chunks)

    try:
        async with asyncio.TaskGroup() as group:  # one chunk that nobody delivers ends all
            for index in range(manifest.num_chunks):
                group.create_task(fetch(index))
    except* ShoalError as failed:
        raise failed.exceptions[0] from None
    loop = asyncio.get_running_loop()
    served_by = sorted({h.peer_id for h in groups[manifest]})
    parsed = await loop.run_in_executor(
        None,
        _verify_and_parse,
        ",".join(served_by),
        parts,
        manifest.size,
        manifest.sha256,
        expected_shapes,
    )
    return (*parsed, served_by)


def _failed(answer: object) -> bool:
    if isinstance(answer, BaseException) and not isinstance(answer, Exception):
        raise answer  # cancellation, not a source's failure
    return isinstance(answer, Exception)


async def _chunk(client: PeerClient, holder: PeerInfo, round_id: int, index: int) -> bytes:
    answer = (
        await client.call(
            holder.address, "POST", "/state/chunk", {"round": round_id, "index": index}
        )
    ).payload
    data = answer.get("data")
    if not isinstance(data, bytes):
        raise ProtocolError("state chunk without data")
    return data


def _verify_and_parse(
    source: str, parts: list[bytes], size: int, sha256: str, expected_shapes
) -> tuple[int, dict[str, torch.Tensor], dict]:
    blob = b"".join(parts)
    if len(blob) != size or hashlib.sha256(blob).hexdigest() != sha256:
        raise ProtocolError(f"state from {source} fails its hash check")
    return parse_state(blob, expected_shapes)
