"""Who holds what: which peers' outer state covers ours, which serve a pipeline stage.

Pure functions over the peer table, shared by the round engine (whose hashes must agree,
whom to download state from), the roles (which stage to take) and CheckFree recovery.
"""

from __future__ import annotations

from typing import Any

from shoal.peer.config import RunConfig
from shoal.peer.membership import Membership, PeerInfo
from shoal.pipeline.stages import StagePlan

NEVER = 2**62  # a standby's first_round: no round waits for its contribution


def same_slice_as(peer: PeerInfo, me: PeerInfo) -> bool:
    """True if `peer` holds exactly our tensors (so our weights hashes must agree)."""
    return peer.role == me.role and (me.role != "stage" or peer.stage == me.stage)


def holding_ours(membership: Membership, peer_ids: list[str]) -> list[str]:
    """Those of `peer_ids` (us included) that hold exactly our tensors."""
    peers = membership.peers
    return [p for p in peer_ids if p in peers and same_slice_as(peers[p], membership.me)]


def covers(peer: PeerInfo, me: PeerInfo) -> bool:
    """True if `peer`'s outer state includes ours (a source to download it from)."""
    return peer.role == "replica" or same_slice_as(peer, me)


def expected_replicas(membership: Membership, round_id: int) -> list[str]:
    """The live full replicas (not us) whose contribution round `round_id` waits for."""
    return [
        p.peer_id
        for p in membership.live_others()
        if p.role == "replica" and p.first_round <= round_id
    ]


def choose_stage(membership: Membership, num_stages: int) -> int:
    """The stage with the least capacity in the swarm: the fewest live stage peers, then
    the lowest measured throughput (tokens/s), then the lowest index."""
    if num_stages < 2:
        raise ValueError("--role stage needs a pipelined run (--stages S, S >= 2)")
    peers = [p for p in membership.live_others() if p.role == "stage" and p.stage is not None]

    def load(stage: int) -> tuple[int, float, int]:
        serving = [p for p in peers if p.stage == stage]
        return len(serving), sum(p.tokens_per_s or 0.0 for p in serving), stage

    return min(range(num_stages), key=load)


def stage_peers(membership: Membership, stage: int, activation: str) -> list[str]:
    """Live peers serving `stage` with our replica's activation codec."""
    return sorted(
        p.peer_id
        for p in membership.live_others()
        if p.role == "stage" and p.stage == stage and p.activation == activation
    )


def stage_holdings(run: RunConfig) -> dict[str, Any] | None:
    """The dashboard's picture of the run's pipeline: what each stage holds."""
    if not run.stages:
        return None
    plan = StagePlan(run.stages, run.model["n_layers"])
    holds = ["embedding, head, loss"]
    for blocks in map(plan.blocks, range(1, run.stages)):
        holds.append(
            f"blocks {blocks.start}–{blocks.stop - 1}"
            if len(blocks) > 1
            else f"block {blocks.start}"
        )
    return {"stages": run.stages, "holds": holds}
