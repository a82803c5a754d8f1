"""CheckFree / CheckFree+ (arXiv 2506.15461): rebuild a pipeline stage that lost every peer
from the weights of its neighbouring stages, with no checkpoint and no redundant compute.

Pure functions over name → tensor dicts; fetching the neighbours' weights and gradient
norms over the network is the caller's job (peer/). The steps:

1. `lost_stages(plan, live)`: block stages with no live peer.
2. `recovery_source(plan, stage, live)`: what to fetch, from which stages:
   - "copy" from the stage itself when a replica survives (a rejoining peer copies it);
   - "average" of stages i−1 and i+1 (CheckFree) when i is an intermediate block stage
     and both neighbours are live;
   - "copy" of the single block neighbour (CheckFree+) when i is the first or last block
     stage and that neighbour is live;
   - "none" otherwise (a neighbour is lost too, or the plan has one block stage): the
     paper gives no recipe; the run must fall back to another source.
3. `rebuild_stage(...)`: the new weights (named with stage i's own block indices).
4. The rebuilt stage trains with fresh AdamW state at lr × `RECOVERY_LR_SCALE`
   (`recovered_inner_config`, `recovered_trainer`).

Stage 0 (embedding, final norm, tied head) has no block neighbour to stand in for it:
as in CheckFree+, which keeps the (de)embedding on the neighbouring stage, every stage-1
peer keeps a copy of stage 0's outer weights, and a peer taking over stage 0 copies that
(`peer/recovery.py`: `StageRecovery.fetch_stage0_copy`, `StageRecovery.rebuild`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch

from shoal.optim.inner import InnerConfig, ParamTrainer
from shoal.pipeline.stages import StagePlan

logger = logging.getLogger(__name__)

# The paper's reference code restarts a rebuilt stage at 1.1 × the run's learning rate
# (`lr_scale` in its configs) to pull the averaged weights toward their new role quickly.
RECOVERY_LR_SCALE = 1.1

RecoveryMode = Literal["copy", "average", "none"]


def lost_stages(plan: StagePlan, live_stage_of_peers: Iterable[int]) -> list[int]:
    """The block stages (1..S−1) that no live peer serves, in order. `live_stage_of_peers`
    holds the stage index of each live peer (repeats allowed)."""
    live = _live_set(plan, live_stage_of_peers)
    return [stage for stage in range(1, plan.num_stages) if stage not in live]


def recovery_source(
    plan: StagePlan, stage: int, live_stages: Iterable[int]
) -> tuple[RecoveryMode, tuple[int, ...]]:
    """How to recover block stage `stage` given the stages that still have a live peer:
    ("copy", (stage,)) if a replica of it survives, ("average", (i−1, i+1)) for CheckFree,
    ("copy", (neighbour,)) for CheckFree+'s edge case, or ("none", ()) when the needed
    neighbours are gone too."""
    _check_block_stage(plan, stage)
    live = _live_set(plan, live_stages)
    if stage in live:
        return "copy", (stage,)
    neighbours = _block_neighbours(plan, stage)
    if not neighbours or not all(n in live for n in neighbours):
        return "none", ()
    return ("average" if len(neighbours) == 2 else "copy"), neighbours


def rebuild_stage(
    plan: StagePlan,
    stage: int,
    prev_weights: Mapping[str, torch.Tensor] | None,
    next_weights: Mapping[str, torch.Tensor] | None,
    prev_grad_norm: float | None = None,
    next_grad_norm: float | None = None,
) -> dict[str, torch.Tensor]:
    """New weights for lost block stage i from the weights of stages i−1 and i+1.

    CheckFree (arXiv 2506.15461): W_i ← (a·W_{i+1} + b·W_{i−1}) / (a + b), where
    a = ‖g_{i+1}‖ and b = ‖g_{i−1}‖ are the neighbours' last gradient norms: each
    neighbour is weighted by its *own* norm, so the neighbour that was still changing more
    contributes more. The abstract says only "weighted average of the closest neighboring
    stages"; the pairing of norm to neighbour is read from the authors' reference code
    (gensyn-ai/CheckFree, simulate_training/convergence_training.py, mode "ours-grad-avg":
    `alpha = |norm[i+1]|` multiplies stage i+1's state, `beta = |norm[i-1]|` stage i−1's).
    shoal passes the pre-clip norms (DESIGN.md); the reference code reads them after its
    clip to 1.0. A norm that is missing, zero, negative or not finite gives equal weights.

    CheckFree+ (same paper): when i is the first or last block stage only one neighbour
    holds blocks (the other is stage 0 or the end of the pipeline); with out-of-order
    execution that neighbour has been doing stage i's job on some microbatches, so its
    blocks are copied. Pass None for the missing side; the norms are then unused.

    Stages may hold different numbers of blocks: block j of stage i (its j-th, counting
    from 0) is built from block j of each neighbour, or the neighbour's last block when it
    has fewer. The result is named with stage i's own block indices (`blocks.{k}.…`),
    computed in float32 and returned in the neighbours' dtype, detached and fresh.

    Raises ValueError for a non-block stage, a missing or superfluous neighbour, weights
    that are not exactly the neighbour's blocks, mismatched shapes or dtypes, or
    non-finite values."""
    _check_block_stage(plan, stage)
    neighbours = _block_neighbours(plan, stage)
    given = {stage - 1: prev_weights, stage + 1: next_weights}
    for side, weights in given.items():
        if side in neighbours and weights is None:
            raise ValueError(f"rebuilding stage {stage} needs the weights of stage {side}")
        if side not in neighbours and weights is not None:
            raise ValueError(
                f"stage {side} holds no blocks: pass None for it when rebuilding stage {stage}"
            )
    if not neighbours:
        raise ValueError(
            f"stage {stage} is the only block stage: CheckFree has no neighbour to rebuild it from"
        )

    by_block = {n: _split_blocks(plan, n, given[n]) for n in neighbours}  # type: ignore[arg-type]
    if len(neighbours) == 2:
        a, b = _averaging_weights(next_grad_norm, prev_grad_norm, stage)
        coefficients = {stage + 1: a, stage - 1: b}
    else:
        coefficients = {neighbours[0]: 1.0}

    rebuilt: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for position, block_index in enumerate(plan.blocks(stage)):
            # block j of stage i ← block min(j, last) of each neighbour
            sources = {n: blocks[min(position, len(blocks) - 1)] for n, blocks in by_block.items()}
            suffixes = _common_suffixes(sources)
            for suffix in suffixes:
                tensors = {n: sources[n][suffix] for n in neighbours}
                rebuilt[f"blocks.{block_index}.{suffix}"] = _combine(
                    tensors, coefficients, f"blocks.{block_index}.{suffix}"
                )
    return rebuilt


def recovered_inner_config(config: InnerConfig) -> InnerConfig:
    """The inner-optimizer settings for a rebuilt stage: the run's, with lr × 1.1.

    The rebuilt stage must also start with fresh optimizer state (a new ParamTrainer):
    the neighbours' Adam moments belong to other layers (see `recovered_trainer`)."""
    return dataclasses.replace(config, lr=config.lr * RECOVERY_LR_SCALE)


def recovered_trainer(
    params: dict[str, torch.nn.Parameter], config: InnerConfig, step_count: int
) -> ParamTrainer:
    """A fresh ParamTrainer (new AdamW moments) at lr × 1.1 for a rebuilt stage's params.
    `step_count` is the run's current inner step, so the lr schedule (warmup) continues
    where the run is instead of warming up again."""
    trainer = ParamTrainer(params, recovered_inner_config(config))
    trainer.step_count = step_count
    return trainer


# ---- helpers ------------------------------------------------------------------------


def _check_block_stage(plan: StagePlan, stage: int) -> None:
    if not 1 <= stage < plan.num_stages:
        raise ValueError(
            f"stage {stage} is not a block stage (1..{plan.num_stages - 1}); "
            "CheckFree rebuilds block stages only"
        )


def _block_neighbours(plan: StagePlan, stage: int) -> tuple[int, ...]:
    """Stage i's neighbours that hold blocks (i−1 unless it is stage 0, i+1 unless past the end)."""
    return tuple(n for n in (stage - 1, stage + 1) if 1 <= n < plan.num_stages)


def _live_set(plan: StagePlan, stages: Iterable[int]) -> set[int]:
    live = set(stages)
    bad = sorted(s for s in live if not 0 <= s < plan.num_stages)
    if bad:
        raise ValueError(f"live stages {bad} out of range 0..{plan.num_stages - 1}")
    return live


def _split_blocks(
    plan: StagePlan, stage: int, weights: Mapping[str, torch.Tensor]
) -> list[dict[str, torch.Tensor]]:
    """Stage `stage`'s weights as one {suffix: tensor} per block, in block order; checks that
    the names are exactly that stage's blocks and every value is finite."""
    indices = plan.blocks(stage)
    blocks: dict[int, dict[str, torch.Tensor]] = {index: {} for index in indices}
    for name, tensor in weights.items():
        parts = name.split(".", 2)
        if (
            len(parts) != 3
            or parts[0] != "blocks"
            or not parts[1].isdigit()
            or int(parts[1]) not in blocks
        ):
            raise ValueError(
                f"weights of stage {stage} contain {name!r}, "
                f"not a parameter of its blocks {list(indices)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"weights of stage {stage}: {name!r} has non-finite values")
        blocks[int(parts[1])][parts[2]] = tensor
    ordered = [blocks[index] for index in indices]
    first = ordered[0]
    for index, block in zip(indices, ordered, strict=True):
        if not block or set(block) != set(first):
            raise ValueError(
                f"weights of stage {stage}: block {index} has parameters {sorted(block)}, "
                f"expected {sorted(first)}"
            )
        # all blocks share one shape per parameter: any block may stand in for any other
        for suffix, tensor in block.items():
            if tensor.shape != first[suffix].shape or tensor.dtype != first[suffix].dtype:
                raise ValueError(
                    f"weights of stage {stage}: "
                    f"blocks.{index}.{suffix} is {tuple(tensor.shape)} {tensor.dtype}, "
                    f"blocks.{indices[0]}.{suffix} is "
                    f"{tuple(first[suffix].shape)} {first[suffix].dtype}"
                )
    return ordered


def _common_suffixes(sources: Mapping[int, dict[str, torch.Tensor]]) -> list[str]:
    names = [sorted(block) for block in sources.values()]
    if any(n != names[0] for n in names):
        raise ValueError(f"neighbour stages' blocks have different parameters: {names}")
    return names[0]


def _averaging_weights(
    next_grad_norm: float | None, prev_grad_norm: float | None, stage: int
) -> tuple[float, float]:
    """(a, b) for W_{i+1}, W_{i−1}: the neighbours' gradient norms, or (1, 1) when either is
    missing, zero, negative or not finite (no information about which side moved more)."""
    norms = (next_grad_norm, prev_grad_norm)
    if all(n is not None and math.isfinite(n) and n > 0 for n in norms):
        return float(next_grad_norm), float(prev_grad_norm)  # type: ignore[arg-type]
    logger.warning(
        "rebuilding stage %d: gradient norms next=%s prev=%s unusable, "
        "averaging with equal weights",
        stage,
        next_grad_norm,
        prev_grad_norm,
    )
    return 1.0, 1.0


def _combine(
    tensors: Mapping[int, torch.Tensor], coefficients: Mapping[int, float], name: str
) -> torch.Tensor:
    """Σ c_n·W_n / Σ c_n in float32, returned in the inputs' dtype and device."""
    first = next(iter(tensors.values()))
    if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors.values()):
        found = {f"stage {n}": (tuple(t.shape), str(t.dtype)) for n, t in tensors.items()}
        raise ValueError(f"{name}: neighbour tensors differ in shape or dtype: {found}")
    total = sum(coefficients.values())
    out = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    for neighbour, tensor in tensors.items():
        out.add_(
            tensor.detach().to(device=first.device, dtype=torch.float32),
            alpha=coefficients[neighbour],
        )
    return out.div_(total).to(first.dtype)
