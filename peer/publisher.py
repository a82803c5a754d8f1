"""The state publisher: frozen snapshots of the outer state, served to joiners and written
as checkpoints.

A snapshot is taken on the training thread, right where the outer state changed (after an
outer step, a resync, a join or a rebuild), with the weights hash computed there once; the
event loop only hands the frozen tensors to the `StateServer` (which serializes them in an
executor on the first request) and the checkpoint writer (its own thread, in order, every
write watched by the peer's TaskOwner: a failed write is logged and shown, not lost).
A stage-1 peer also serves its copy of stage 0's weights (CheckFree+) beside its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from shoal.optim.outer import OuterOptimizer
from shoal.peer.checkpoint import save_checkpoint
from shoal.peer.statesync import StateServer
from shoal.peer.tasks import TaskOwner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """The outer state (weights and optimizer state) as of the start of round `round_id`."""

    round_id: int
    tensors: Mapping[str, torch.Tensor]  # copies: never mutated after the snapshot
    weights_hash: str


def take_snapshot(outer: OuterOptimizer, round_id: int) -> Snapshot:
    """Freeze `outer`'s state (training thread: it owns the tensors)."""
    tensors = {name: t.clone() for name, t in outer.state_tensors().items()}
    return Snapshot(round_id, tensors, outer.weights_hash())


class StatePublisher:
    def __init__(
        self,
        peer_id: str,
        server: StateServer,
        tasks: TaskOwner,
        checkpoint_dir: str | None,
        checkpoint_info: Mapping[str, Any],
    ) -> None:
        self.peer_id, self.server, self.tasks = peer_id, server, tasks
        self.checkpoint_dir, self.checkpoint_info = checkpoint_dir, checkpoint_info
        self.latest: Snapshot | None = None
        self._extra: tuple[Mapping[str, torch.Tensor], dict[str, Any]] = ({}, {})
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"ckpt-{peer_id}")  # in order

    def publish(self, snapshot: Snapshot) -> None:
        """Serve `snapshot` from now on and checkpoint it (round > 0) in the background."""
        self.latest = snapshot
        self._serve()
        if self.checkpoint_dir and snapshot.round_id > 0:
            info = dict(self.checkpoint_info)
            future = asyncio.get_running_loop().run_in_executor(
                self._writer,
                save_checkpoint,
                self.checkpoint_dir,
                snapshot.round_id,
                dict(snapshot.tensors),
                info,
            )
            self.tasks.watch(future, name=f"checkpoint of round {snapshot.round_id}")

    def set_extra(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        """Serve `tensors` (frozen) and `metadata` beside every snapshot from now on."""
        self._extra = (tensors, metadata)
        if self.latest is not None:
            self._serve()

    @property
    def has_extra(self) -> bool:
        return bool(self._extra[0])

    def _serve(self) -> None:
        assert self.latest is not None
        extra_tensors, extra_metadata = self._extra
        tensors = {**self.latest.tensors, **extra_tensors}
        # nothing of this peer's own in it: peers in step serve byte-identical blobs, and a
        # joiner can take its chunks from all of them (statesync._download_spread)
        metadata = dict(extra_metadata)
        self.server.update(self.latest.round_id, tensors, metadata)

    def close(self) -> None:
        """Let the last checkpoint land."""
        self._writer.shutdown(wait=True)
