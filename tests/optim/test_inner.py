import itertools

import torch

from shoal.optim.inner import InnerConfig, InnerStats, InnerTrainer
from shoal.train import build_model


def fixed_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 33), generator=g)
    return itertools.repeat((x[:, :-1], x[:, 1:]))


def test_inner_steps_learn_and_keep_optimizer_state():
    trainer = InnerTrainer(
        build_model("tiny", seed=0),
        InnerConfig(lr=1e-2, batch_size=4, seq_len=32, warmup_steps=3),
        fixed_batches(),
        torch.device("cpu"),
    )
    start = trainer.local_weights()
    first = trainer.run(20)
    assert first.steps == 20 and first.tokens == 20 * 4 * 32
    second = trainer.run(20)
    assert second.train_loss < first.train_loss - 0.5  # memorises the repeated batch
    assert trainer.step_count == 40
    assert trainer.optimizer.state  # AdamW moments persist across phases (DiLoCo keeps them)
    trainer.load_weights(start)
    assert all(torch.equal(trainer.local_weights()[n], start[n]) for n in start)
    assert trainer.optimizer.state


def test_warmup_ramps_the_learning_rate():
    trainer = InnerTrainer(
        build_model("tiny", seed=0),
        InnerConfig(lr=1e-2, warmup_steps=4),
        fixed_batches(),
        torch.device("cpu"),
    )
    seen = []
    trainer.run(6, on_step=lambda step, loss: seen.append(trainer.optimizer.param_groups[0]["lr"]))
    assert seen == [2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2]


def test_phases_add_up_and_an_empty_round_keeps_a_finite_loss():
    overlapped, rest = InnerStats(2, 20, 1.0, 3.0), InnerStats(6, 60, 2.0, 2.0)
    both = overlapped + rest
    assert (both.steps, both.tokens, both.seconds) == (8, 80, 3.0) and both.train_loss == (
        2 * 3.0 + 6 * 2.0
    ) / 8
    # a stage peer whose driver died at a round's start sees no step in either phase; its
    # loss is the driver's last, not 0/0 (a NaN in the peer table made others refuse it)
    assert (InnerStats(0, 0, 0.0, float("nan")) + InnerStats(0, 0, 5.0, 2.5)).train_loss == 2.5
