"""A machine with several devices is one peer: N ranks of torch.distributed inside, one
identity outside.

    shoal peer --nproc N ...            rank 0 is this process; it starts ranks 1..N-1
    torchrun --nproc-per-node N -m shoal.peer.cli peer ...   the same, launched by torchrun

Rank 0 is the peer the swarm sees: it serves, gossips, exchanges pseudo-gradients and
keeps the outer state (CPU memory). Ranks 1..N-1 talk only to rank 0, through
torch.distributed (gloo on CPU, NCCL on CUDA; on 127.0.0.1): they train their part of
every batch and do whatever rank 0 tells them.

The inside is SPMD: rank 0's training thread drives a `RankedTrainer`, which, before each
trainer call, broadcasts a command (four int64 values: never a pickle), so every rank
makes the same call in the same order and the collectives inside it (DDP's gradient
all-reduce, FSDP's all-gathers) line up. A batch of the run's `batch_size` is split into
N equal parts, one per rank, each rank drawing the same stream (same peer id and seed)
and keeping its part: N ranks train exactly as one device on the whole batch would.

At start-up rank 0 broadcasts what the ranks need to build the same trainer (the run,
the data, the device settings) as JSON. A rank that dies breaks the next collective on
every other rank (and its launcher notices the exit): the peer stops with an error and
the swarm goes on without it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from shoal.optim.inner import InnerConfig, InnerStats, InnerTrainer

log = logging.getLogger(__name__)

GROUP_TIMEOUT = timedelta(seconds=120)  # a collective that waits longer fails
OP_STOP, OP_RUN, OP_LOAD, OP_LOCAL, OP_EVAL, OP_RESTART = range(6)
SHARD_MODES = ("auto", "none", "fsdp")


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as torchrun or `--nproc` set them; (0, 1) for a plain peer."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(nproc: int, device: str) -> list[subprocess.Popen]:
    """Start ranks 1..nproc-1 of this peer (this process becomes rank 0)."""
    port = free_port()
    base = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "SHOAL_RANK_DEVICE": device,
    }
    os.environ.update(base, RANK="0", LOCAL_RANK="0")
    return [
        subprocess.Popen(
            [sys.executable, "-m", "shoal.peer.ranks"],
            env={**os.environ, **base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
        )
        for rank in range(1, nproc)
    ]


def rank_device(name: str, local_rank: int) -> torch.device:
    """This rank's device: GPU `local_rank` for cuda (the peer's GPUs are 0..N-1), else CPU."""
    from shoal.train import resolve_device

    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"--nproc asks for GPU {local_rank}; this machine has fewer")
    return torch.device("cuda", local_rank)


def join_group(device: torch.device) -> None:
    rank, world = world_from_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=GROUP_TIMEOUT)


def broadcast_json(obj: Any | None) -> Any:
    """Rank 0's JSON-able `obj`, on every rank (as UTF-8 bytes in two broadcasts)."""
    data = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(size, src=0)
    buffer = torch.zeros(int(size), dtype=torch.uint8)
    if dist.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.numpy()).decode())


def rank_batches(
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]], rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of every batch of the peer's stream."""
    for x, y in batches:
        if len(x) % world:
            raise ValueError(f"--batch-size {len(x)} must be a multiple of --nproc {world}")
        part = len(x) // world
        yield x[rank * part : (rank + 1) * part], y[rank * part : (rank + 1) * part]


def choose_shard(mode: str, model: torch.nn.Module, device: torch.device) -> str:
    """ "fsdp" or "none" (DDP): `auto` shards when weights, gradients and AdamW's moments
    (16 bytes a weight) would fill more than half of one device."""
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "none"
    need = 16 * sum(p.numel() for p in model.parameters())
    return "fsdp" if need > torch.cuda.get_device_properties(device).total_memory // 2 else "none"


def parallel_forward(model: torch.nn.Module, shard: str, device: torch.device) -> Callable:
    """The callable the rank trains through: DDP around the model, or the model itself with
    FSDP2 applied in place (each block its own unit, then the root), so parameter names
    stay the model's own."""
    if shard == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # the model's only buffers are the rotary tables, equal on every rank: no forward sync
    quiet = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if quiet else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **sync)


def build_rank_trainer(
    model: torch.nn.Module,
    inner: InnerConfig,
    batches: Iterator,
    device: torch.device,
    shard_mode: str,
    compile: bool,
) -> tuple[InnerTrainer, str]:
    """This rank's trainer over its part of the batches, and the shard mode chosen."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model.to(device)
    shard = choose_shard(shard_mode, model, device)
    forward = parallel_forward(model, shard, device)
    trainer = InnerTrainer(
        model, inner, rank_batches(batches, rank, world), device, compile=compile, wrap=forward
    )
    return trainer, shard


def start_ranks(ctx: Any, model: torch.nn.Module) -> RankedTrainer:
    """Rank 0 (training thread): join the peer's group, tell the other ranks what to build
    (the run, the data, the device settings), and build our own part."""
    config, schedule = ctx.config, ctx.config.schedule
    device = rank_device(schedule.device, 0)
    join_group(device)
    setup = {
        "run": config.run.to_dict(),
        "tokenizer": config.files.tokenizer,
        "data_path": config.data.path,
        "shards": config.data.num_shards,
        "eval_batches": config.data.eval_batches,
        "peer_id": config.peer_id,
        "threads": schedule.torch_threads,
        "checkpoint_activations": schedule.checkpoint_activations,
        "shard": schedule.shard,
        "compile": schedule.compile,
    }
    broadcast_json(setup)
    trainer, shard = build_rank_trainer(
        model, config.run.inner, ctx.batches, device, schedule.shard, schedule.compile
    )
    log.info(
        "[%s] %d ranks (%s, %s)",
        config.peer_id,
        dist.get_world_size(),
        "FSDP2" if shard == "fsdp" else "DDP",
        dist.get_backend(),
    )
    return RankedTrainer(trainer, shard)


class RankedTrainer:
    """Rank 0's trainer: the same interface as `InnerTrainer`, every call made on all ranks."""

    def __init__(self, trainer: InnerTrainer, shard: str) -> None:
        self.trainer, self.shard = trainer, shard
        self.world = dist.get_world_size()
        self.names = list(trainer.params)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.trainer.params

    @property
    def step_count(self) -> int:
        return self.trainer.step_count

    @property
    def last_grad_norm(self) -> float | None:
        return self.trainer.last_grad_norm

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    def _command(self, op: int, a: int = 0) -> None:
        dist.broadcast(torch.tensor([op, a, 0, 0], dtype=torch.int64), src=0)

    @contextlib.contextmanager
    def _together(self, op: int, a: int = 0) -> Iterator[None]:
        """Tell the other ranks to make call `op`, and make it here. A rank that is gone
        breaks the collectives of the call: that ends this peer, saying so."""
        try:
            self._command(op, a)
            yield
        except (RuntimeError, dist.DistBackendError) as exc:
            raise RuntimeError(
                f"a collective of this peer's {self.world} ranks failed (did a rank exit?): {exc}"
            ) from exc

    def run(self, steps: int, on_step: Callable[[int, float], None] | None = None) -> InnerStats:
        with self._together(OP_RUN, steps):
            stats = self.trainer.run(steps, on_step)
        # the loss is rank 0's part; the tokens are the whole peer's
        return InnerStats(stats.steps, stats.tokens * self.world, stats.seconds, stats.train_loss)

    def load_weights(self, weights) -> None:
        full = {name: weights[name].to("cpu", torch.float32).contiguous() for name in self.names}
        with self._together(OP_LOAD):
            broadcast_weights(full)
            self.trainer.load_weights(full)

    def local_weights(self) -> dict[str, torch.Tensor]:
        with self._together(OP_LOCAL):
            return self.trainer.local_weights()

    def evaluate(self, batches) -> float:
        with self._together(OP_EVAL):
            return self.trainer.evaluate(batches)

    def restart(self, config: InnerConfig, step: int) -> None:
        with self._together(OP_RESTART, step):
            self.trainer.restart(config, step)

    def close(self) -> None:
        """Tell the other ranks to exit, then leave the group (a rank that is gone already
        broke the group: nothing to tell)."""
        if not dist.is_initialized():
            return
        try:
            self._command(OP_STOP)
            dist.barrier()  # leave together: a rank torn down mid-exchange aborts the others
        except (RuntimeError, dist.DistBackendError) as exc:
            log.warning("could not tell the other ranks to stop: %s", exc)
        finally:
            dist.destroy_process_group()


def broadcast_weights(full: dict[str, torch.Tensor]) -> None:
    """Rank 0's fp32 CPU tensors into every rank's `full` (same names and shapes)."""
    for tensor in full.values():
        dist.broadcast(tensor, src=0)


def serve_rank(device_name: str) -> int:
    """Ranks 1..N-1: build the same trainer as rank 0, then do what it says until it stops.
    `device_name` is the peer's --device (the backend must be rank 0's before anything
    else can be said)."""
    from shoal.peer.runconfig import RunConfig
    from shoal.train import build_model, load_data, load_tokenizer

    rank, _ = world_from_env()
    device = rank_device(device_name, int(os.environ.get("LOCAL_RANK", rank)))
    join_group(device)
    try:
        setup = broadcast_json(None)
        if setup["threads"]:
            torch.set_num_threads(setup["threads"])
        run = RunConfig.from_dict(setup["run"])
        data = load_data(setup["data_path"], load_tokenizer(setup["tokenizer"]), setup["shards"])
        stream = data.train_batches(
            setup["peer_id"], run.inner.batch_size, run.inner.seq_len, seed=run.seed
        )
        eval_set = data.eval_batches(run.inner.batch_size, run.inner.seq_len, setup["eval_batches"])
        model = build_model(run.model_config(), seed=run.seed)
        model.checkpoint_activations = setup["checkpoint_activations"]
        trainer, _ = build_rank_trainer(
            model, run.inner, stream, device, setup["shard"], setup["compile"]
        )
        follow(trainer, run.inner, eval_set)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def follow(trainer: InnerTrainer, inner: InnerConfig, eval_set) -> None:
    """Do rank 0's commands until OP_STOP."""
    command = torch.zeros(4, dtype=torch.int64)
    shapes = {name: tuple(p.shape) for name, p in trainer.model.named_parameters()}
    while True:
        dist.broadcast(command, src=0)
        op, arg = int(command[0]), int(command[1])
        if op == OP_STOP:
            dist.barrier()
            return
        if op == OP_RUN:
            trainer.run(arg)
        elif op == OP_LOAD:
            full = {name: torch.empty(shape) for name, shape in shapes.items()}
            broadcast_weights(full)
            trainer.load_weights(full)
        elif op == OP_LOCAL:
            trainer.local_weights()
        elif op == OP_EVAL:
            trainer.evaluate(eval_set)
        elif op == OP_RESTART:
            trainer.restart(inner, arg)
        else:
            raise RuntimeError(f"rank {dist.get_rank()}: unknown command {op} from rank 0")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s rank %(message)s")
    code = serve_rank(os.environ.get("SHOAL_RANK_DEVICE", "auto"))
    logging.shutdown()
    # the group is destroyed; skip the interpreter's teardown, where a gloo thread still
    # being destroyed (with FSDP) sometimes aborts the process
    os._exit(code)
