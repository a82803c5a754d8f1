"""Checkpoints: outer weights and outer-optimizer state as safetensors plus a JSON manifest.

Layout of `--checkpoint-dir`:
    round-000012.safetensors   the tensors (names as in OuterOptimizer.state_tensors)
    round-000012.json          {round, sha256 of the tensors file, run config, peer id, time}
Both are written to a temporary file in the same folder and renamed into place, the
tensors first: a manifest exists only for a complete tensors file, so a crash at any
moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_MANIFEST = re.compile(r"^round-(\d{6,})\.json$")


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, synced, then renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    directory: str | Path,
    round_id: int,
    tensors: dict[str, torch.Tensor],
    info: dict,
    keep: int = 3,
) -> Path:
    """Write round `round_id` atomically and keep only the newest `keep` checkpoints."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"round-{round_id:06d}"
    tensors_path = folder / f"{stem}.safetensors"
    atomic_write(
        tensors_path, lambda tmp: save_file({n: t.contiguous() for n, t in tensors.items()}, tmp)
    )
    manifest = {
        "round": round_id,
        "tensors": tensors_path.name,
        "sha256": file_sha256(tensors_path),
        "saved_at": time.time(),
        **info,
    }
    atomic_write(
        folder / f"{stem}.json",
        lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1, sort_keys=True)),
    )
    for old in list_checkpoints(folder)[:-keep]:
        (folder / f"round-{old:06d}.json").unlink(missing_ok=True)
        (folder / f"round-{old:06d}.safetensors").unlink(missing_ok=True)
    return folder / f"{stem}.json"


def list_checkpoints(directory: str | Path) -> list[int]:
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _MANIFEST.match(p.name)))


def load_latest(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint whose tensors match its manifest's hash, or None."""
    folder = Path(directory)
    for round_id in reversed(list_checkpoints(folder)):
        manifest = json.loads((folder / f"round-{round_id:06d}.json").read_text())
        tensors_path = folder / manifest["tensors"]
        if tensors_path.is_file() and file_sha256(tensors_path) == manifest["sha256"]:
            return load_file(tensors_path), manifest
    return None
