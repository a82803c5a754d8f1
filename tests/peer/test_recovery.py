"""StageRecovery.rebuild's choice of weights, with the neighbours' state faked."""

import asyncio
import threading
from types import SimpleNamespace

import torch

from shoal.optim.inner import InnerConfig
from shoal.optim.outer import OuterConfig
from shoal.peer import recovery
from shoal.peer.config import ProtocolConfig, RunConfig
from shoal.train import PRESETS

RUN = RunConfig(
    model_preset="tiny-deep",
    model=PRESETS["tiny-deep"].to_dict(),
    inner=InnerConfig(),
    outer=OuterConfig(),
    inner_steps=10,
    stages=4,
)


def rebuild_at(neighbour_round: int, monkeypatch) -> tuple[int, dict, list]:
    """Stage 2 is lost; stages 1 and 3 serve and report `neighbour_round`. Returns what the
    rebuild restarted from: (round, weights of one tensor, how)."""
    serving = [
        SimpleNamespace(peer_id=f"s{k}", role="stage", stage=k, activation="raw", step=37)
        for k in (0, 1, 3)
    ]
    for p in serving:
        p.grad_norm = 0.5
    agent = SimpleNamespace(
        peer_id="standby", membership=SimpleNamespace(live_others=lambda: serving)
    )
    rec = recovery.StageRecovery(agent, None, RUN, "raw", ProtocolConfig(), threading.Event())

    async def fake_download(client, sources, shapes, attempts):
        (stage,) = {p.stage for p in sources}
        return (
            neighbour_round,
            {n: torch.full(s, float(stage)) for n, s in shapes.items()},
            None,
        )

    monkeypatch.setattr(recovery, "download_state", fake_download)
    restarted = []

    async def restart(round_id, weights, inner, step):
        restarted.append((round_id, weights, step))

    initial = {
        n: torch.full(s, -1.0) for n, s in recovery.outer_shapes(rec.model, rec.plan, 2).items()
    }
    rebuilt = asyncio.run(rec.rebuild(2, restart, initial))
    ((round_id, weights, step),) = restarted
    assert step == 37  # the run's inner step: no second warmup
    return round_id, weights, rebuilt


def test_a_stage_lost_in_round_0_restarts_from_the_initial_weights(monkeypatch):
    """Before the first outer step the lost stage's outer weights are the run's initial ones
    (exact), not an average of its neighbours'; a standby whose gossiped view of the round
    lags always asks, and this is what the neighbours' own round 0 gives it."""
    round_id, weights, rebuilt = rebuild_at(0, monkeypatch)
    assert round_id == 0 and not rebuilt
    assert all(torch.equal(t, torch.full_like(t, -1.0)) for t in weights.values())


def test_a_stage_lost_later_is_rebuilt_from_its_neighbours(monkeypatch):
    round_id, weights, rebuilt = rebuild_at(3, monkeypatch)
    assert round_id == 3 and rebuilt
    assert all(not torch.equal(t, torch.full_like(t, -1.0)) for t in weights.values())
