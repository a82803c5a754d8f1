"""Subspace confinement on the tiny model: after `confine_module` and `confine_`, a stage
boundary coded with the `subspace` codec gives the uncompressed loss and the uncompressed
stage-0 gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal.compression import ActivationCodec, get_activation_codec
from shoal.optim.inner import InnerConfig, ParamTrainer
from shoal.pipeline.subspace import (
    basis_for_model,
    confine_,
    confine_grads_,
    confine_module,
    confinement_error,
    writer_lr_scale,
)
from shoal.train import Transformer, build_model

SEED, K = 0, 8
WRITERS = (
    "blocks.0.attn.proj.weight",
    "blocks.0.mlp.down.weight",
    "blocks.1.attn.proj.weight",
    "blocks.1.mlp.down.weight",
)


@pytest.fixture(scope="module")
def basis():
    return basis_for_model("tiny", K, SEED)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def confined_model(basis, learned_embedding: bool = True) -> Transformer:
    """The tiny model, confined; with the embedding moved off E0 in every direction, as the
    head's gradient moves it in training."""
    model = build_model("tiny", seed=SEED)
    if learned_embedding:
        with torch.no_grad():
            model.embed.weight.add_(
                0.05
                * torch.randn(model.embed.weight.shape, generator=torch.Generator().manual_seed(7))
            )
    confine_module(model, basis)
    confine_(model, basis)
    return model


def stage0_params(model: Transformer) -> dict[str, torch.Tensor]:
    return {
        name: p
        for name, p in model.named_parameters()
        if name == "embed.weight" or name.startswith("blocks.0.")
    }


def two_stages(
    model: Transformer, ids: torch.Tensor, targets: torch.Tensor, codec: ActivationCodec | None
):
    """Stage 0 = embed + block 0, stage 1 = the rest + head. Returns the loss and the stage-0
    gradients computed from the gradient message stage 1 sends back."""
    d_model = model.config.d_model
    h1 = model.forward_blocks(model.embed_tokens(ids), 0, 1)
    received = h1.detach() if codec is None else codec.decode(codec.encode(h1, ids), ids, d_model)
    received.requires_grad_(True)
    loss = F.cross_entropy(
        model.head(model.forward_blocks(received, 1)).reshape(-1, 256), targets.reshape(-1)
    )
    (grad_h1,) = torch.autograd.grad(loss, received)
    if codec is not None:
        grad_h1 = codec.decode_grad(codec.encode_grad(grad_h1, ids), ids, d_model)
    params = stage0_params(model)
    grads = torch.autograd.grad(h1, list(params.values()), grad_outputs=grad_h1)
    return loss.detach(), dict(zip(params, grads, strict=True))


def project_grad(name: str, grad: torch.Tensor, basis) -> torch.Tensor:
    """What `confine_grads_` does, written out: U U^T G for writers, nothing to the rest."""
    return (
        basis.U @ basis.U.T @ grad
        if name.endswith(("attn.proj.weight", "mlp.down.weight"))
        else grad
    )


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_basis_for_model_is_the_initial_embedding(basis) -> None:
    model = build_model("tiny", seed=SEED)
    assert torch.equal(basis.E0, model.embed.weight.detach())
    assert basis.basis_id == basis_for_model("tiny", K, SEED).basis_id
    assert basis.basis_id != basis_for_model("tiny", K, SEED + 1).basis_id
    assert (basis.d_model, basis.k) == (32, K)
    assert (
        abs(float((basis.U.T @ basis.E0[:K].T).abs().max())) < 0.1
    )  # U not drawn from E0's stream
    embed_before = model.embed.weight.detach().clone()
    confine_module(model, basis)
    assert sorted(confine_(model, basis)) == sorted(WRITERS)
    assert torch.equal(model.embed.weight, embed_before)  # the parameter is not confined...
    ids, _ = batch()
    assert torch.allclose(
        model.embed_tokens(ids), embed_before[ids], atol=1e-6
    )  # ...and its view starts at E


def test_confine_projects_only_residual_writers(basis) -> None:
    model = build_model("tiny", seed=SEED)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert confinement_error(model, basis) > 0.5
    confine_(model, basis)
    assert confinement_error(model, basis) < 1e-5
    for name, param in model.named_parameters():
        if name not in WRITERS:
            assert torch.equal(param, before[name]), name
    snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
    confine_(model, basis)  # a projection: idempotent
    for name, param in model.named_parameters():
        assert torch.allclose(param, snapshot[name], atol=1e-7), name


def test_confine_a_stage_slice(basis) -> None:
    model = build_model("tiny", seed=SEED)
    stage1 = {name: p for name, p in model.named_parameters() if name.startswith("blocks.1.")}
    assert sorted(confine_(stage1, basis)) == [
        "blocks.1.attn.proj.weight",
        "blocks.1.mlp.down.weight",
    ]
    assert confinement_error(stage1, basis) < 1e-5
    assert confinement_error(stage0_params(model), basis) > 0.5  # untouched
    with pytest.raises(ValueError, match="expected"):
        confine_({"blocks.0.mlp.down.weight": torch.zeros(16, 96)}, basis)


def test_stream_stays_in_subspace(basis) -> None:
    model = confined_model(basis)
    ids, _ = batch()
    projector = basis.U @ basis.U.T
    embed_learned = model.embed.weight.detach() - basis.E0
    assert (
        rel_diff(embed_learned @ projector, embed_learned) > 0.5
    )  # the parameter moved outside span(U)
    with torch.no_grad():
        for end in range(model.config.n_layers + 1):
            learned = model.forward_blocks(model.embed_tokens(ids), 0, end) - basis.E0[ids]
            assert rel_diff(learned @ projector, learned) < 1e-5, end


def test_subspace_boundary_matches_uncompressed(basis) -> None:
    model = confined_model(basis)
    ids, targets = batch()
    codec = get_activation_codec("subspace", basis=basis)
    exact_loss, exact = two_stages(model, ids, targets, None)
    loss, compressed = two_stages(model, ids, targets, codec)
    assert abs(float(loss - exact_loss)) < 1e-3 * float(exact_loss)
    for name, grad in compressed.items():
        # non-writing parameters and the embedding (its lookup's gradient comes out of the
        # confined view already projected) get exactly the uncompressed gradient; writers the
        # same gradient once projected as confine_grads_ does
        assert (
            rel_diff(project_grad(name, grad, basis), project_grad(name, exact[name], basis)) < 1e-2
        ), name
        if project_grad(name, grad, basis) is grad:
            assert rel_diff(grad, exact[name]) < 1e-2, name
    # ...while the raw writer gradients differ: the codec does not carry g outside span(U)
    assert rel_diff(compressed["blocks.0.mlp.down.weight"], exact["blocks.0.mlp.down.weight"]) > 0.3


def test_unconfined_boundary_is_lossy(basis) -> None:
    model = build_model("tiny", seed=SEED)
    ids, targets = batch()
    codec = get_activation_codec("subspace", basis=basis)
    exact_loss, _ = two_stages(model, ids, targets, None)
    loss, _ = two_stages(model, ids, targets, codec)
    with torch.no_grad():
        h1 = model.forward_blocks(model.embed_tokens(ids), 0, 1)
        error = rel_diff(codec.decode(codec.encode(h1, ids), ids, 32), h1)
    assert error > 1e-2 and loss != exact_loss


def train(
    basis, codec: ActivationCodec | None, steps: int = 10, project_grads: bool = True
) -> dict[str, torch.Tensor]:
    """Projected AdamW on two stages, as the trainer runs it (see pipeline/subspace.py).
    Returns each parameter's total update (final − initial) and checks the loss fell."""
    model = build_model("tiny", seed=SEED)
    confine_module(model, basis)
    confine_(model, basis)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    ids, targets = batch()  # one batch, memorised: the loss must fall
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        h1 = model.forward_blocks(model.embed_tokens(ids), 0, 1)
        received = h1.detach() if codec is None else codec.decode(codec.encode(h1, ids), ids, 32)
        received.requires_grad_(True)
        loss = F.cross_entropy(
            model.head(model.forward_blocks(received, 1)).reshape(-1, 256), targets.reshape(-1)
        )
        loss.backward()  # stage 1's parameters, and the tied head's part of embed.weight
        grad_h1 = (
            received.grad
            if codec is None
            else codec.decode_grad(codec.encode_grad(received.grad, ids), ids, 32)
        )
        h1.backward(grad_h1)  # stage 0
        if project_grads:
            assert sorted(confine_grads_(model, basis)) == sorted(WRITERS)
        optimizer.step()
        confine_(model, basis)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5
    return {name: p.detach() - initial[name] for name, p in model.named_parameters()}


def test_training_with_subspace_codec_follows_uncompressed_run(basis) -> None:
    codec = get_activation_codec("subspace", basis=basis)
    exact, compressed = train(basis, None), train(basis, codec)
    for name, update in compressed.items():  # measured: 0.0003 to 0.015 after 10 AdamW steps
        assert rel_diff(update, exact[name]) < 0.05, name
    # Without confine_grads_, AdamW's per-element normalisation turns the gradient's part
    # outside span(U), which the codec does not carry, into different in-span updates.
    exact, compressed = (
        train(basis, None, project_grads=False),
        train(basis, codec, project_grads=False),
    )
    for name in WRITERS[:2]:  # measured: > 1.0
        assert rel_diff(compressed[name], exact[name]) > 0.3, name


def test_confined_writers_step_at_sqrt_k_over_d(basis) -> None:
    """AdamW moves each element of a writer by ~lr, nearly all of it inside span(U): the
    confinement gives the writers lr·sqrt(k/d), every other parameter the run's lr."""
    model = build_model("tiny", seed=SEED)
    trainer = ParamTrainer(
        dict(model.named_parameters()),
        InnerConfig(lr=1e-3, weight_decay=0.0),
        confine_module(model, basis),
    )
    scale = (K / 32) ** 0.5
    assert writer_lr_scale(basis) == pytest.approx(scale)
    groups = {
        group["lr_scale"]: {id(p) for p in group["params"]}
        for group in trainer.optimizer.param_groups
    }
    assert set(groups) == {1.0, scale}
    assert groups[scale] == {id(model.get_parameter(name)) for name in WRITERS}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids, targets = batch()
    model(ids, targets)[1].backward()
    trainer.optimizer_step()
    assert sorted(group["lr"] for group in trainer.optimizer.param_groups) == pytest.approx(
        [1e-3 * scale, 1e-3]
    )
    # AdamW's first step moves an element by lr·g/|g|: the gain's (not confined) by exactly lr
    moved = (
        model.get_parameter("blocks.0.mlp_norm.weight").detach()
        - before["blocks.0.mlp_norm.weight"]
    ).abs()
    assert float(moved.max()) == pytest.approx(1e-3, rel=1e-3)
    writer = model.get_parameter(WRITERS[0]).detach() - before[WRITERS[0]]
    assert (
        float(writer.norm()) < 1.1 * 1e-3 * scale * writer.numel() ** 0.5
    )  # ~lr·sqrt(k/d) per element, then projected
