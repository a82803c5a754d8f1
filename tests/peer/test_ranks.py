"""A peer on several ranks (torch.distributed, gloo on CPU): its inner steps equal one
device's on the same global batch, with DDP and with FSDP2; weights go in and come out
whole."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from shoal.optim.inner import InnerConfig, InnerTrainer
from shoal.peer.ranks import build_rank_trainer, free_port, join_group, rank_batches
from shoal.train import build_model

INNER = InnerConfig(lr=1e-3, batch_size=8, seq_len=16)
STEPS = 3


def global_batches():
    generator = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        ids = torch.randint(0, 256, (8, 17), generator=generator)
        yield ids[:, :-1], ids[:, 1:]


def one_rank(rank: int, world: int, port: int, shard: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    device = torch.device("cpu")
    join_group(device)
    try:
        trainer, chosen = build_rank_trainer(
            build_model("tiny", seed=0), INNER, global_batches(), device, shard, False
        )
        assert chosen == shard
        trainer.run(STEPS)
        trained = trainer.local_weights()  # a collective under FSDP: every rank calls it
        shifted = {name: tensor + 1 for name, tensor in trained.items()}
        trainer.load_weights(shifted)  # each rank keeps its shard of the whole tensors
        back = trainer.local_weights()
        if rank == 0:
            save_file(trained, out)
            assert all(torch.equal(back[n], shifted[n]) for n in shifted)
        dist.barrier()  # leave together (as RankedTrainer.close does)
    finally:
        dist.destroy_process_group()
    # skip the interpreter's teardown: with FSDP, a gloo thread still being destroyed there
    # sometimes aborts the process ("terminate called without an active exception")
    os._exit(0)


@pytest.mark.parametrize("shard", ["none", "fsdp"])
def test_two_ranks_step_as_one_device_on_the_whole_batch(tmp_path, shard):
    out = str(tmp_path / "two.safetensors")
    mp.start_processes(
        one_rank, args=(2, free_port(), shard, out), nprocs=2, start_method="spawn", join=True
    )
    single = InnerTrainer(build_model("tiny", seed=0), INNER, global_batches(), torch.device("cpu"))
    single.run(STEPS)
    expected, got = single.local_weights(), load_file(out)
    assert got.keys() == expected.keys()
    worst = max((got[n] - expected[n]).abs().max().item() for n in expected)
    assert worst <= 1e-5, worst
    moved = max(
        (expected[n] - build_model("tiny", seed=0).state_dict()[n]).abs().max().item()
        for n in expected
    )
    assert moved > 1e-3  # the steps did train


def test_each_rank_takes_its_part_of_every_batch():
    x = torch.arange(8).view(8, 1).expand(8, 3)
    parts = [next(rank_batches(iter([(x, x + 1)]), r, 4)) for r in range(4)]
    assert [p[0][:, 0].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="multiple of --nproc 3"):
        next(rank_batches(iter([(x, x)]), 0, 3))
