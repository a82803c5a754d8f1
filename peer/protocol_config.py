"""The peer protocol's timeouts and limits, in one place (`--config`'s `[protocol]`).

Every wait of a peer is bounded by one of these, and every size limit is one of these or
derived from the run (`peer/limits.py`). Each has a flag: the field's name less `_s`, e.g.
`--heartbeat-interval`, `--request-timeout`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from shoal.peer.options import flag_name, setting


@dataclass(frozen=True)
class ProtocolConfig:
    """Timeouts and limits of the peer protocol."""

    heartbeat_interval_s: float = setting(1.0, "seconds between heartbeats (and gossip rounds)")
    gossip_fanout: int = setting(3, "peers gossiped with per heartbeat")
    gossip_timeout_s: float | None = setting(
        None,
        "longest wait for one gossip answer (default: two heartbeats and a second)",
        kind=float,
    )
    suspect_after_s: float = setting(
        3.0,
        "a peer no probe reached is suspect (still waited for) for dead-after minus this, "
        "then dead unless it refutes",
    )
    dead_after_s: float = setting(
        6.0, "see --suspect-after; a dead peer is left out of rounds and gossip"
    )
    forget_after_s: float = setting(600.0, "a dead peer is dropped from the table after this long")
    probe_quiet_heartbeats: float = setting(
        1.5,
        "--standby: a stage's peers count as lost once quiet "
        "this many heartbeats and a direct probe fails",
    )
    probe_timeout_s: float = setting(1.0, "--standby: longest wait for such a probe")
    join_timeout_s: float = setting(30.0, "keep trying an unreachable --bootstrap this long")
    min_peers_timeout_s: float = setting(
        600.0, "give up (exit with an error) when --min-peers have not joined after this long"
    )
    gather_timeout_s: float | None = setting(
        None,
        "seconds to wait for others' contributions (default: "
        "as long as our inner phase took, at least "
        "--min-gather-timeout)",
        kind=float,
    )
    min_gather_timeout_s: float = setting(10.0, "the least a peer waits for others' contributions")
    agree_timeout_s: float = setting(
        5.0, "wait for the participants' sets and hashes beyond the gather deadline"
    )
    partner_timeout_s: float = setting(
        10.0, "noloco: seconds to wait for the step's partner before stepping alone"
    )
    max_poll_s: float = setting(5.0, "longest single long poll of a round request")
    request_timeout_s: float = setting(
        30.0, "longest wait for any one request's answer (and a pipeline hop's)"
    )
    rounds_kept: int = setting(
        3, "recent rounds whose contributions, sets and hashes a peer serves"
    )
    state_chunk_bytes: int = setting(4 * 2**20, "bytes per chunk of the state download")
    state_download_attempts: int = setting(3, "passes over the sources a state download makes")
    state_serve_timeout_s: float = setting(
        120.0, "longest a state request waits for the snapshot to be serialized"
    )
    stage0_copy_attempts: int = setting(
        5, "stage 1: tries to fetch stage 0's weights after a round (CheckFree+)"
    )
    stage0_copy_pause_s: float = setting(0.5, "stage 1: pause between those tries")
    stage_round_wait_s: float = setting(120.0, "a stage waits this long for the round a hop names")
    pipeline_stall_timeout_s: float = setting(
        600.0,
        "stage 0 stops with an error when the pipeline has "
        "not stepped for this long (a stage without peers)",
    )
    hop_max_attempts: int = setting(4, "stage 0: tries per microbatch")
    hop_retry_pause_s: float = setting(
        0.5, "stage 0: pause before a microbatch's next try, doubling"
    )
    router_ban_s: float = setting(
        10.0, "stage 0: a failed stage peer is avoided this long, doubling per repeat"
    )
    router_max_ban_s: float = setting(120.0, "stage 0: the longest such ban")
    saved_input_ttl_s: float = setting(
        300.0, "a stage drops a microbatch's saved input after this long without its backward"
    )
    max_request_bytes: int | None = setting(
        None,
        "largest request body accepted (default: sized from "
        "the run: a batch of fp32 activations, at least 8 MiB)",
        kind=int,
    )
    max_response_bytes: int = setting(2 * 2**30, "largest answer body accepted")
    compress_above_bytes: int = setting(
        64 * 1024, "bodies from this size on are zstd-compressed and packed off the event loop"
    )
    max_clock_skew_s: float = setting(300.0, "messages stamped further off our clock are refused")
    linger_s: float = setting(
        60.0, "after the last round, serve until the others finish theirs, at most this long"
    )
    dial_back_timeout_s: float = setting(
        3.0, "longest wait for a joiner's answer when dialling it back (and a relay's first)"
    )
    relay_poll_s: float = setting(10.0, "client mode: longest single long poll at a relay")
    relay_idle_s: float = setting(
        30.0, "a relay drops a client that has not polled for this long (its requests: 503)"
    )
    relay_timeout_s: float = setting(
        300.0, "a relayed request waits at most this long for the answer of the peer behind"
    )
    relay_max_clients: int = setting(64, "peers behind NAT one relay serves at most")
    relay_max_pending: int = setting(
        256, "requests queued or in flight for one peer behind NAT at its relay"
    )
    relay_batch: int = setting(16, "requests a relay hands over in one poll answer at most")
    relay_failures: int = setting(
        3, "client mode: consecutive failed polls before a relay is replaced"
    )
    relay_ban_s: float = setting(60.0, "client mode: a replaced relay is not chosen again so soon")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not value > 0:
                raise ValueError(f"{flag_name(f)} must be positive, got {value}")
        if self.dead_after_s < self.suspect_after_s:
            raise ValueError("--dead-after must be at least --suspect-after")
        if self.forget_after_s < self.dead_after_s:
            raise ValueError("--forget-after must be at least --dead-after")
        if self.router_max_ban_s < self.router_ban_s:
            raise ValueError("--router-max-ban must be at least --router-ban")

    def gather_deadline_s(self, inner_seconds: float) -> float:
        """How long to wait for others after publishing: as long as our own inner phase took
        (slower peers get that much slack), never less than `min_gather_timeout_s`."""
        if self.gather_timeout_s is not None:
            return self.gather_timeout_s
        return max(self.min_gather_timeout_s, inner_seconds)

    def gossip_wait_s(self) -> float:
        """The longest wait for one gossip answer."""
        if self.gossip_timeout_s is not None:
            return self.gossip_timeout_s
        return 2 * self.heartbeat_interval_s + 1

    def ping_timeout_s(self) -> float:
        """The longest wait for a probe's answer before probing indirectly (SWIM): a
        heartbeat and half a second, at most `gossip_wait_s()`."""
        return min(self.gossip_wait_s(), self.heartbeat_interval_s + 0.5)
