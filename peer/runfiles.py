"""The run definition, the files it names by hash, and how a joiner gets them.

A run is defined by its `RunConfig`, which names the files it needs by their sha256: the
tokenizer (`RunConfig.tokenizer`) and, for continued pretraining, the initial weights
(`RunConfig.init`). With the hash of the data manifest the founding peer trains on (shown,
not enforced: a volunteer may bring its own data) it forms the `RunDefinition`, which has
its own hash.

A peer started with `--bootstrap URL` and no run settings asks that peer for the run:
`POST /run` → `{definition, sha256, tokenizer}`. The definition's hash and the tokenizer
file's hash are checked, and the tokenizer is kept in the cache folder by its hash
(`$SHOAL_CACHE_DIR`, default `~/.cache/shoal`). `--init-from`'s weights do not travel this
way: a peer without them downloads the run's current state from the swarm, as a late
joiner does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.peer.checkpoint import atomic_write, file_sha256
from shoal.peer.client import PeerClient, PeerUnreachable, Traffic
from shoal.peer.errors import ConfigMismatch, ProtocolError, ShoalError
from shoal.peer.identity import Identity
from shoal.peer.protocol_config import ProtocolConfig
from shoal.peer.runconfig import BYTES_TOKENIZER, RunConfig
from shoal.peer.wire import WireCodec

MAX_TOKENIZER_BYTES = 64 * 2**20  # a 256k-vocabulary tokenizer.json is ~20 MB
INDEX_FILE = "model.safetensors.index.json"


def init_files(folder: str | Path) -> list[Path]:
    """The files of a Hugging Face checkpoint folder that define its model: config.json and
    the weights (model.safetensors, or the shards its index names), in a fixed order."""
    root = Path(folder)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"--init-from {folder}: unreadable {INDEX_FILE}: {exc}") from None
        names = ["config.json", INDEX_FILE, *shards]
    else:
        names = ["config.json", "model.safetensors"]
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise ValueError(f"--init-from {folder}: missing {', '.join(missing)}")
    return [root / name for name in names]


def init_sha256(folder: str | Path) -> str:
    """One hash over a checkpoint folder's model files (their names and contents)."""
    digest = hashlib.sha256()
    for path in init_files(folder):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class RunDefinition:
    """What a joiner needs to know to take part: the run, and the founder's data manifest."""

    run: RunConfig
    data_manifest_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run.to_dict(), "data_manifest_sha256": self.data_manifest_sha256}

    def sha256(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @classmethod
    def from_dict(cls, obj: Any) -> RunDefinition:
        if not isinstance(obj, dict) or not isinstance(obj.get("run"), dict):
            raise ProtocolError("a run definition is a map holding the run")
        manifest = obj.get("data_manifest_sha256")
        if manifest is not None and not isinstance(manifest, str):
            raise ProtocolError("data_manifest_sha256 must be a string")
        return cls(RunConfig.from_dict(obj["run"]), manifest)


def run_answer(definition: RunDefinition, tokenizer_path: str | None) -> dict[str, Any]:
    """The answer to `POST /run` (server side)."""
    tokenizer = None
    if definition.run.tokenizer != BYTES_TOKENIZER:
        assert tokenizer_path is not None, "a run with a tokenizer file has its path"
        tokenizer = Path(tokenizer_path).read_bytes()
    definition_dict = definition.to_dict()
    return {"definition": definition_dict, "sha256": definition.sha256(), "tokenizer": tokenizer}


def read_answer(payload: dict[str, Any]) -> tuple[RunDefinition, bytes | None]:
    """The definition and tokenizer file of a `/run` answer, every hash checked."""
    definition = RunDefinition.from_dict(payload.get("definition"))
    if payload.get("sha256") != definition.sha256():
        raise ProtocolError("the run definition does not match its hash")
    tokenizer = payload.get("tokenizer")
    if definition.run.tokenizer == BYTES_TOKENIZER:
        return definition, None
    if not isinstance(tokenizer, bytes) or len(tokenizer) > MAX_TOKENIZER_BYTES:
        raise ProtocolError("the run's tokenizer file is missing or too large")
    if f"sha256:{hashlib.sha256(tokenizer).hexdigest()}" != definition.run.tokenizer:
        raise ProtocolError("the tokenizer file does not match the run's tokenizer hash")
    return definition, tokenizer


def cache_dir() -> Path:
    return Path(os.environ.get("SHOAL_CACHE_DIR") or Path.home() / ".cache" / "shoal")


def keep_tokenizer(data: bytes, folder: str | Path | None = None) -> Path:
    """Store a tokenizer file (atomically) in `folder` as tokenizer.json, or by default in
    the cache under its hash; its path."""
    if folder is None:
        path = cache_dir() / "tokenizers" / f"{hashlib.sha256(data).hexdigest()}.json"
    else:
        path = Path(folder) / "tokenizer.json"
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


async def call_bootstrap(
    client: PeerClient, bootstrap: str, path: str, payload: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """A joiner's first call: retried while `bootstrap` cannot be reached, for `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return (await client.call(bootstrap, "POST", path, payload, joining=True)).payload
        except PeerUnreachable as exc:
            if time.monotonic() > deadline:
                raise ShoalError(
                    f"cannot reach bootstrap {bootstrap} within {timeout_s:.0f} s "
                    f"(--join-timeout): {exc}"
                ) from None
            await asyncio.sleep(0.5)


async def fetch_run(
    bootstrap: str,
    swarm_key: str | None,
    protocol: ProtocolConfig,
    identity: Identity | None = None,
) -> tuple[RunDefinition, str | None]:
    """The run `bootstrap` trains, and the path of its tokenizer file in the cache (asked
    with `identity`, or a key made for this one request)."""
    wire = WireCodec(
        f"joiner-{secrets.token_hex(4)}",
        "joining",
        swarm_key,
        max_body_bytes=2**20,
        max_clock_skew_s=protocol.max_clock_skew_s,
        identity=identity,
    )
    client = PeerClient(
        wire,
        Traffic(),
        request_timeout_s=protocol.request_timeout_s,
        max_response_bytes=MAX_TOKENIZER_BYTES + 2**20,
    )
    await client.start()
    try:
        answer = await call_bootstrap(client, bootstrap, "/run", {}, protocol.join_timeout_s)
    finally:
        await client.close()
    try:
        definition, tokenizer = read_answer(answer)
    except (ProtocolError, ConfigMismatch) as exc:
        raise ShoalError(f"bootstrap {bootstrap} sent an unusable run definition: {exc}") from None
    path = None if tokenizer is None else str(keep_tokenizer(tokenizer))
    return definition, path


def load_init_weights(folder: str | Path, run: RunConfig) -> dict[str, Any]:
    """`--init-from`'s weights under shoal's parameter names, checked against the run's
    hash of the files and the run's model."""
    from shoal.train.hf import load_hf_weights

    reference = f"sha256:{init_sha256(folder)}"
    if reference != run.init:
        raise ConfigMismatch(
            f"--init-from {folder} holds other files than the run's ({reference}, run {run.init})"
        )
    model, weights = load_hf_weights(folder)
    if model != run.model_config():
        raise ConfigMismatch(f"--init-from {folder}'s config.json is not the run's model")
    return weights
