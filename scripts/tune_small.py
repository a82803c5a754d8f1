"""Simulate `shoal demo --peers 3 --rounds 6` in one process, to tune the `small` recipe.

What the demo does, minus the network: R replicas start from the same init
(`build_model(preset, seed)`), each with its own persistent AdamW (the peers' own
InnerTrainer: warmup, grad clipping, wd on every weight), each trains H steps on its own
shard (peer ids "peer-0", "peer-1", ...) on one CPU thread; then the real DiLoCo outer step
(`--outer`: DiLoCo or SparseLoCo from optim/, pseudo-gradients through the run's codec)
and every replica ← θ_outer; the eval loss after each round on
the same fixed eval batches a peer uses (`--eval-batches`, the peers' default 8), plus a
larger set (`--big-eval-batches`) to see how noisy the small one is.

Sequential single-thread wall time is reported; the demo runs the replicas as separate
processes on the machine's cores, so on 2 cores it takes roughly half of it plus start-up
and exchange overhead.

    python scripts/tune_small.py                       # the recipe in train/recipe.py
    python scripts/tune_small.py --inner-steps 60 --inner-lr 2e-3 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from shoal.optim.inner import InnerConfig, InnerTrainer
from shoal.optim.registry import build_outer, outer_config
from shoal.train import PRESETS, RECIPES, ByteData, build_model, evaluate, load_corpus


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="small", choices=sorted(PRESETS))
    for dim in ("d_model", "n_layers", "n_heads", "d_ff"):
        parser.add_argument(
            "--" + dim.replace("_", "-"), type=int, help=f"override the preset's {dim}"
        )
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--inner-steps", type=int, help="H (default: the recipe's)")
    parser.add_argument("--inner-lr", type=float, help="(default: the recipe's)")
    parser.add_argument("--warmup-steps", type=int, help="(default: the recipe's)")
    parser.add_argument("--batch-size", type=int, help="(default: the recipe's)")
    parser.add_argument("--seq-len", type=int, help="(default: the recipe's)")
    parser.add_argument("--outer", default="diloco", help="outer optimizer (diloco, sparseloco)")
    parser.add_argument("--outer-lr", type=float, help="(default: the optimizer's)")
    parser.add_argument("--outer-momentum", type=float, help="(default: the optimizer's)")
    parser.add_argument(
        "--codec", help="pseudo-gradient codec (default: the optimizer's; int8 for diloco)"
    )
    parser.add_argument(
        "--eval-batches",
        type=int,
        default=8,
        help="what a peer evaluates on (PeerConfig default 8)",
    )
    parser.add_argument(
        "--big-eval-batches",
        type=int,
        default=64,
        help="a larger eval set, to gauge noise (0: skip)",
    )
    parser.add_argument("--num-shards", type=int, default=16)
    parser.add_argument("--data", help="corpus path (default: the stdlib sources, as the demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a demo peer on 2 cores gets 1)"
    )
    parser.add_argument("--json", help="write the per-round results here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.model]
    overrides = {
        k: getattr(args, k) for k in ("d_model", "n_layers", "n_heads", "d_ff") if getattr(args, k)
    }
    config = dataclasses.replace(PRESETS[args.model], **overrides)
    inner = InnerConfig(
        lr=args.inner_lr or recipe.inner_lr,
        warmup_steps=recipe.warmup_steps if args.warmup_steps is None else args.warmup_steps,
        batch_size=args.batch_size or recipe.batch_size,
        seq_len=args.seq_len or recipe.seq_len,
    )
    inner_steps = args.inner_steps or recipe.inner_steps
    outer_settings = outer_config(
        args.outer, lr=args.outer_lr, momentum=args.outer_momentum, codec=args.codec
    )
    device = torch.device("cpu")

    start = time.perf_counter()
    data = ByteData(load_corpus(args.data), num_shards=args.num_shards)
    eval_set = data.eval_batches(inner.batch_size, inner.seq_len, args.eval_batches)
    big_eval = (
        data.eval_batches(inner.batch_size, inner.seq_len, args.big_eval_batches)
        if args.big_eval_batches
        else None
    )
    init = build_model(config, seed=args.seed)
    trainers = []
    for i in range(args.peers):
        peer_id = f"peer-{i}"
        replica = build_model(config, seed=args.seed)
        batches = data.train_batches(peer_id, inner.batch_size, inner.seq_len, seed=args.seed)
        trainers.append(InnerTrainer(replica, inner, batches, device))
    # one outer optimizer per replica: each keeps its own local state (SparseLoCo's error
    # buffer); all apply the same decoded contributions, so their weights stay identical
    outers = [build_outer(dict(init.named_parameters()), outer_settings) for _ in trainers]
    shards = [data.shard_for(f"peer-{i}", args.num_shards) for i in range(args.peers)]
    print(f"model {config.to_dict()} params {config.num_params:,}")
    print(
        f"inner {inner.to_dict()} H={inner_steps}  "
        f"outer {outer_settings.to_dict()}  shards {shards}"
    )
    initial = evaluate(trainers[0].model, eval_set, device)
    print(f"setup {time.perf_counter() - start:.1f} s, initial eval {initial:.3f}")

    rows, train_seconds = [], 0.0
    for round_id in range(1, args.rounds + 1):
        stats = [t.run(inner_steps) for t in trainers]
        train_seconds += sum(s.seconds for s in stats)
        contributions = [
            o.decode_contribution(o.contribution(t.local_weights()))
            for o, t in zip(outers, trainers, strict=True)
        ]
        for outer in outers:
            outer.apply(contributions)
        for trainer in trainers:
            trainer.load_weights(outers[0].params)
        eval_loss = evaluate(trainers[0].model, eval_set, device)
        big_loss = evaluate(trainers[0].model, big_eval, device) if big_eval else None
        train_loss = sum(s.train_loss for s in stats) / len(stats)
        wall = time.perf_counter() - start
        rows.append(
            {
                "round": round_id,
                "eval_loss": eval_loss,
                "eval_loss_big": big_loss,
                "train_loss": train_loss,
                "wall_s": wall,
            }
        )
        big = f"  eval({args.big_eval_batches}) {big_loss:.3f}" if big_loss is not None else ""
        print(
            f"round {round_id}: eval({args.eval_batches}) {eval_loss:.3f}{big}  "
            f"train {train_loss:.3f}  "
            f"s/step {stats[0].seconds / inner_steps:.3f}  wall {wall:.0f} s",
            flush=True,
        )
    wall = time.perf_counter() - start
    print(
        f"total wall {wall:.0f} s (training {train_seconds:.0f} s); "
        f"final eval {rows[-1]['eval_loss']:.3f}"
    )
    if args.json:
        result = {
            "model": config.to_dict(),
            "params": config.num_params,
            "inner": inner.to_dict(),
            "inner_steps": inner_steps,
            "outer": outer_settings.to_dict(),
            "peers": args.peers,
            "initial_eval_loss": initial,
            "rounds": rows,
            "wall_s": wall,
            "train_s": train_seconds,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
