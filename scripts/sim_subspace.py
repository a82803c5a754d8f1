"""Activation compression's eval loss at equal tokens, in one process and in seconds: a
proxy for the loss half of `scripts/bench_pipeline.py --parts codec` (four `shoal peer`
processes, minutes a row), for trying subspace policies quickly.

    python scripts/sim_subspace.py --seeds 0 1 2 --out results/sim_subspace.json

Model `small` cut as the benchmark cuts it (stage 0 = embedding, head and loss; stages 1-3
= blocks 0-1, 2, 3), the `small` recipe, 6 outer rounds of 25 inner steps. Each stage's
inner step is the runtime's (`pipeline.worker.SliceTrainer.step`: its own clipping and
AdamW, and the subspace confinement when the runtime would confine), each round ends with
the runtime's DiLoCo int8 outer step per stage (one peer per stage, as in the benchmark),
and every stage boundary passes through the activation codec's own encode and decode,
forward and backward. A batch runs as one microbatch (the mean over equal microbatches is
the same gradient).

Variants (`--variants`), each an activation spec as `--activation` takes it, optionally
prefixed:
* `SPEC` (`none`, `int8`, `subspace:32`, `subspace-int8:32`, ...): the runtime: weights
  confined to E0 + span(U) (pipeline/subspace.py), one fixed basis;
* `head-confined:SPEC`: the runtime as it first was: the embedding *parameter* confined
  too (E ← E0 + (E − E0) U U^T after every step, its gradient projected G U U^T), so the
  tied head also learns only inside span(U); the runtime confines only the lookup;
* `writers-scaled:SPEC`: uncompressed and unconfined (codec none), but the writers step
  at the factor SPEC's confinement gives them (pipeline/subspace.writer_lr_scale): is
  that factor simply a better recipe for every run?
* `boundary:SPEC`: the same codec and basis, weights not confined: each stage boundary
  projects the stream onto E0[token] + span(U) (what the codec's encode computes), blocks
  write freely inside a stage;
* `learned:SPEC`: boundary projection with a basis per sending stage, learned: over each
  round the loss's gradient with respect to each basis is summed (the sender's half
  a·c_g^T, a = h − E0[token] and c_g the gradient coordinates it gets back, and the
  receiver's half g·c^T, g its full input gradient and c the coordinates it got), then
  one Adam-normalised step of `--basis-lr` is taken and the basis re-orthonormalised
  (QR). The runtime has no protocol for this: it is here to measure what one would buy.

Reported per variant: final held-out loss per seed, its mean, and the mean of the
per-seed ratios to `none` (so `none` must be among the variants).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from shoal.compression import SubspaceBasis
from shoal.compression.activation import ActivationCodec, get_activation_codec
from shoal.optim.diloco import DiLoCo
from shoal.optim.inner import InnerConfig
from shoal.optim.outer import OuterConfig
from shoal.pipeline.compression import parse_activation
from shoal.pipeline.stages import StagePlan, build_stage
from shoal.pipeline.subspace import Confinement
from shoal.pipeline.worker import SliceTrainer
from shoal.train import PRESETS, RECIPES
from shoal.train.data import ByteData, load_corpus

MODEL, STAGES = "small", 4
VARIANTS = ("none", "subspace-int8:32", "boundary:subspace-int8:32", "learned:subspace-int8:32")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class Boundary:
    """One stage boundary's codec, and for `learned` its basis and gradient statistics."""

    def __init__(self, codec: ActivationCodec, learn: bool) -> None:
        self.codec, self.learn = codec, learn
        basis = getattr(codec, "basis", None)
        if learn:
            self.grad = torch.zeros_like(basis.U)
            self.moment, self.second, self.steps = (
                torch.zeros_like(basis.U),
                torch.zeros_like(basis.U),
                0,
            )

    def apply(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return _Hop.apply(h, ids, self)

    def step(self, lr: float) -> None:
        """Adam-normalised step on the round's summed gradient, then QR back to orthonormal."""
        basis = self.codec.basis
        b1, b2 = ADAM_BETAS
        self.steps += 1
        self.moment.mul_(b1).add_(self.grad, alpha=1 - b1)
        self.second.mul_(b2).addcmul_(self.grad, self.grad, value=1 - b2)
        update = (self.moment / (1 - b1**self.steps)) / (
            (self.second / (1 - b2**self.steps)).sqrt() + ADAM_EPS
        )
        q, r = torch.linalg.qr((basis.U - lr * update).double())
        q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)  # keep each column's sign
        self.codec = get_activation_codec(self.codec.name, basis=SubspaceBasis(q.float(), basis.E0))
        self.grad.zero_()


class EmbeddingConfined:
    """`head-confined`: stage 0's constraint with the embedding parameter confined as well."""

    def __init__(self, inner: Confinement) -> None:
        self.inner, self.basis = inner, inner.basis

    def grads(self, params: dict[str, torch.Tensor]) -> None:
        self.inner.grads(params)
        grad = params["embed.weight"].grad
        if grad is not None:
            grad.copy_((grad @ self.basis.U) @ self.basis.U.T)

    @torch.no_grad()
    def weights(self, params: dict[str, torch.Tensor]) -> None:
        self.inner.weights(params)
        E, (U, E0) = params["embed.weight"], (self.basis.U, self.basis.E0)
        E.copy_(E0 + ((E - E0) @ U) @ U.T)

    def lr_scales(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.inner.lr_scales(params)


class WritersScaled:
    """`writers-scaled`: no constraint, only the confined writers' learning-rate factor."""

    def __init__(self, basis: SubspaceBasis) -> None:
        self.scales = Confinement(basis).lr_scales

    def grads(self, params: dict[str, torch.Tensor]) -> None:
        pass

    def weights(self, params: dict[str, torch.Tensor]) -> None:
        pass

    def lr_scales(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.scales(params)


class _Hop(torch.autograd.Function):
    """The stream through a codec: forward encode → decode, backward encode_grad → decode_grad."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, ids: torch.Tensor, boundary: Boundary) -> torch.Tensor:
        codec = boundary.codec
        received = codec.decode(codec.encode(h.detach(), ids), ids, h.size(-1))
        ctx.boundary, ctx.ids = boundary, ids
        if boundary.learn:
            U, E0 = codec.basis.U, codec.basis.E0
            ctx.save_for_backward(h.detach() - E0[ids], (received - E0[ids]) @ U)
        return received

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        boundary, ids = ctx.boundary, ctx.ids
        codec = boundary.codec
        sent = codec.decode_grad(codec.encode_grad(g.detach(), ids), ids, g.size(-1))
        if boundary.learn:
            a, c = (t.reshape(-1, t.size(-1)) for t in ctx.saved_tensors)
            c_g = sent.reshape(-1, g.size(-1)) @ codec.basis.U
            boundary.grad += (
                a.T @ c_g + g.reshape(-1, g.size(-1)).T @ c
            )  # sender's half + receiver's half
        return sent, None, None


def train(
    variant: str, seed: int, rounds: int, inner_steps: int, basis_lr: float, eval_batches: int
) -> dict:
    torch.manual_seed(seed)
    recipe, config = RECIPES[MODEL], PRESETS[MODEL]
    mode, spec = (
        variant.split(":", 1)
        if variant.startswith(("head-confined:", "writers-scaled:", "boundary:", "learned:"))
        else ("runtime", variant)
    )
    setting = parse_activation(spec, config, seed)
    if mode != "runtime" and setting.basis is None:
        raise SystemExit(f"{variant}: {mode} needs a subspace codec")
    plan = StagePlan(STAGES, config.n_layers)
    stages = {s: build_stage(config, plan, s, seed) for s in range(STAGES)}
    inner = InnerConfig(
        lr=recipe.inner_lr,
        warmup_steps=recipe.warmup_steps,
        batch_size=recipe.batch_size,
        seq_len=recipe.seq_len,
    )
    confine = setting.basis if mode in ("runtime", "head-confined") else None
    trainers = {
        s: SliceTrainer(module, inner, torch.device("cpu"), confine) for s, module in stages.items()
    }
    if mode == "head-confined":
        trainers[0].constraint = EmbeddingConfined(trainers[0].constraint)
    if mode == "writers-scaled":
        for trainer in trainers.values():
            trainer.constraint = WritersScaled(setting.basis)
            trainer.restart(inner, 0)  # the optimizer's groups from the factor
        setting = parse_activation("none", config, seed)
    outers = {
        s: DiLoCo(trainer.local_weights(), OuterConfig(codec="int8"))
        for s, trainer in trainers.items()
    }  # as peer/node.py
    for stage, trainer in trainers.items():
        trainer.load_weights(outers[stage].params)
    # boundary b carries stage b's output (b = 0: the embedding; b = S-1: the last stage's,
    # to the head)
    boundaries = [Boundary(setting.codec, mode == "learned") for _ in range(STAGES)]
    data = ByteData(load_corpus(None))
    batches = data.train_batches("peer-0", recipe.batch_size, recipe.seq_len, seed)
    held_out = data.eval_batches(recipe.batch_size, recipe.seq_len, eval_batches)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = stages[0].embed_tokens(x)
        for stage in range(1, STAGES):
            h = stages[stage](boundaries[stage - 1].apply(h, x))
        return stages[0].loss(boundaries[-1].apply(h, x), y)

    curve, begin = [], time.monotonic()
    for _ in range(rounds):
        for _ in range(inner_steps):
            x, y = (torch.as_tensor(t) for t in next(batches))
            loss_of(x, y).backward()
            for trainer in trainers.values():
                trainer.microbatches = 1
                trainer.step()
        for (
            stage,
            trainer,
        ) in trainers.items():  # the runtime's round: contribution, apply, continue from θ_outer
            outer = outers[stage]
            outer.apply([outer.decode_contribution(outer.contribution(trainer.local_weights()))])
            trainer.load_weights(outer.params)
        for boundary in boundaries:
            if boundary.learn:
                boundary.step(basis_lr)
        with torch.no_grad():
            curve.append(
                sum(float(loss_of(torch.as_tensor(x), torch.as_tensor(y))) for x, y in held_out)
                / len(held_out)
            )
    return {
        "final_eval_loss": curve[-1],
        "curve": curve,
        "k": getattr(setting.basis, "k", None),
        "seconds": time.monotonic() - begin,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--inner-steps", type=int, default=25)
    parser.add_argument(
        "--basis-lr", type=float, default=1e-2, help="learned: step of the per-round basis update"
    )
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/sim_subspace.json")
    args = parser.parse_args()
    if "none" not in args.variants:
        parser.error("--variants must include none (the baseline of the ratios)")
    torch.set_num_threads(args.threads)
    results: dict[str, dict] = {}
    for variant in args.variants:
        runs = {}
        for seed in args.seeds:
            runs[seed] = train(
                variant, seed, args.rounds, args.inner_steps, args.basis_lr, args.eval_batches
            )
            print(
                f"   {variant} seed {seed}: eval {runs[seed]['final_eval_loss']:.4f} "
                f"({runs[seed]['seconds']:.0f} s)",
                flush=True,
            )
        results[variant] = {
            "k": runs[args.seeds[0]]["k"],
            "runs": {str(s): r for s, r in runs.items()},
        }
    base = results["none"]["runs"]
    print(f"{'variant':<30} {'k':>3} {'mean eval':>10} {'vs none':>8}  per seed")
    for variant, row in results.items():
        finals = [r["final_eval_loss"] for r in row["runs"].values()]
        ratios = [
            r["final_eval_loss"] / base[s]["final_eval_loss"] - 1 for s, r in row["runs"].items()
        ]
        row.update(mean_eval_loss=statistics.fmean(finals), mean_vs_none=statistics.fmean(ratios))
        print(
            f"{variant:<30} {row['k'] or '-':>3} {row['mean_eval_loss']:10.4f} "
            f"{100 * row['mean_vs_none']:+7.1f}%  " + " ".join(f"{100 * v:+.1f}%" for v in ratios)
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python scripts/sim_subspace.py " + " ".join(sys.argv[1:]),
                "model": MODEL,
                "stages": STAGES,
                "rounds": args.rounds,
                "inner_steps": args.inner_steps,
                "basis_lr": args.basis_lr,
                "results": results,
            },
            indent=1,
        )
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
