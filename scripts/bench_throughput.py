"""Inner-step throughput on this machine: tokens/s and model FLOPs utilisation (MFU).

One inner step is what a peer runs H times a round: forward, backward, gradient clipping
and an AdamW step on a (batch, seq) batch of token ids (bf16 autocast on CUDA, fp32 on a
CPU), as `optim.inner.InnerTrainer` runs it. Each row times `--steps` steps after
`--warmup` untimed ones (the first steps allocate, and compile with --compile).

FLOPs per token follow the PaLM paper's accounting (Chowdhery et al. 2022, appendix B):
6·N for the matmul weights N (every weight but the embedding lookup; the tied head's
projection counts) plus 12·L·d·T for attention over T positions; MFU divides the achieved
FLOP/s by the device's peak dense bf16 FLOP/s. A CPU has no such number here: its rows
report achieved FLOP/s and leave MFU empty.

    python scripts/bench_throughput.py --models small base configs/llama-125m/config.json \\
        --out results/bench_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shoal.optim.inner import InnerConfig, InnerTrainer
from shoal.peer.ranks import RankedTrainer, build_rank_trainer, free_port, join_group, rank_device
from shoal.peer.runconfig import recipe_for
from shoal.train import build_model, resolve_device
from shoal.train.hf import load_model_config
from shoal.train.model import ModelConfig

# dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100": 989.4e12,  # an H100 whose form factor the name does not tell: the SXM part
    "A100": 312.0e12,
    "L40S": 362.0e12,
    "A10G": 125.0e12,
    "L4": 121.0e12,
    "RTX 4090": 165.2e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(config: ModelConfig, seq: int) -> float:
    matmul_weights = config.num_params - config.d_model * (2 * config.n_layers + 1)  # norms
    if not config.tie_embeddings:
        matmul_weights -= config.vocab_size * config.d_model  # the lookup is not a matmul
    return 6 * matmul_weights + 12 * config.n_layers * config.d_model * seq


def random_batches(vocab: int, batch: int, seq: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
        yield ids[:, :-1], ids[:, 1:]


def bench(spec: str, args: argparse.Namespace, device: torch.device, nproc: int = 1) -> dict:
    """One row; with `nproc` > 1, this process is one rank of a peer's group (the batch is
    the peer's: each rank trains its part, as `shoal peer --nproc` does)."""
    name, config = load_model_config(spec)
    recipe = recipe_for(name, config)
    batch, seq = args.batch_size or recipe.batch_size, args.seq_len or recipe.seq_len
    model = build_model(config, seed=0)
    model.checkpoint_activations = args.checkpoint_activations
    inner = InnerConfig(lr=recipe.inner_lr, batch_size=batch, seq_len=seq)
    batches = random_batches(config.vocab_size, batch, seq)
    if nproc > 1:  # every rank runs this code; rank 0's commands are the others' receives
        trainer, shard = build_rank_trainer(model, inner, batches, device, args.shard, args.compile)
        trainer = RankedTrainer(trainer, shard)
    else:
        trainer = InnerTrainer(model, inner, batches, device, compile=args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run(args.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    stats = trainer.run(args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - begin
    tokens_per_s = stats.tokens / seconds
    achieved = tokens_per_s * flops_per_token(config, seq)
    peak = peak_flops(device)
    return {
        "model": name,
        "nproc": nproc,
        "params": config.num_params,
        "batch_size": batch,
        "seq_len": seq,
        "steps": args.steps,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "achieved_tflops": round(achieved / 1e12, 4),
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else round(achieved / peak, 4),
        "train_loss": round(stats.train_loss, 4),
        "peak_memory_mib": (
            round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if device.type == "cuda"
            else None
        ),
    }


def bench_ranks(spec: str, args: argparse.Namespace, nproc: int) -> dict:
    """A row of `nproc` ranks, each a process with its share of --threads; rank 0's row."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder, "row.json")
        port = free_port()
        mp.start_processes(
            _rank, args=(nproc, port, spec, args, str(out)), nprocs=nproc, start_method="spawn"
        )
        return json.loads(out.read_text())


def _rank(rank: int, world: int, port: int, spec: str, args: argparse.Namespace, out: str):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(max(1, (args.threads or torch.get_num_threads()) // world))
    device = rank_device(args.device, rank)
    join_group(device)
    try:
        row = bench(spec, args, device, nproc=world)
        dist.barrier()
        if rank == 0:
            Path(out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "base"], metavar="PRESET|CONFIG")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="default: the model's recipe")
    parser.add_argument("--seq-len", type=int, help="default: the model's recipe")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--nproc",
        type=int,
        nargs="+",
        default=[1],
        help="ranks of one peer per row (torch.distributed; gloo on CPU, --threads split)",
    )
    parser.add_argument("--shard", default="auto", choices=("auto", "none", "fsdp"))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = []
    for spec, nproc in itertools.product(args.models, args.nproc):
        row = bench(spec, args, device) if nproc == 1 else bench_ranks(spec, args, nproc)
        rows.append(row)
        mfu = "" if row["mfu"] is None else f"  MFU {100 * row['mfu']:.1f}%"
        print(
            f"{row['model']:>12s} ({row['params'] / 1e6:.1f}M) x{nproc} batch {row['batch_size']}x"
            f"{row['seq_len']}: {row['tokens_per_s']:,.0f} tokens/s  "
            f"{row['achieved_tflops']:.3f} TFLOP/s{mfu}",
            flush=True,
        )
    result = {
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        ),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compile": args.compile,
        "checkpoint_activations": args.checkpoint_activations,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
