"""Configuration: one tree of frozen dataclasses, validated once at start-up.

    PeerConfig
      run       RunConfig: what every peer of a run shares (compared on /join)
      network   where this peer listens, how others reach it, whom it joins, its key
      pipeline  its role in a pipeline replica and stage 0's routing
      data      its corpus and evaluation
      schedule  device, threads, rounds, checkpoints
      protocol  every timeout and limit of the peer protocol

Each field of the sections below is a `setting` with its help text, which is also its
flag's (`peer/options.py` generates the `shoal` flags and reads `--config FILE` from the
same fields); error messages name the flag to change. The run's settings as given on the
command line (`RunSettings`, `InnerSettings`, `OuterSettings`: None means the preset's or
the optimizer's default) resolve into the `RunConfig` that travels.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from shoal.peer.envelope import ID_PATTERN
from shoal.peer.identity import Identity, load_allow_list
from shoal.peer.local_config import DataConfig, ScheduleConfig
from shoal.peer.options import setting, stage_list
from shoal.peer.protocol_config import ProtocolConfig
from shoal.peer.runconfig import (  # noqa: F401 - the run's part of the tree, re-exported
    InnerSettings,
    OuterSettings,
    RunConfig,
    RunFiles,
    RunSettings,
    resolve_run,
)
from shoal.pipeline.skippipe import SkipPipeConfig
from shoal.pipeline.worker import RESCALE_MODES

# ---- one peer's sections ---------------------------------------------------------------


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def undialable(host: str) -> str | None:
    """What `host` is when other machines cannot dial it (loopback; 0.0.0.0 or ::), else None."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return "the loopback address" if host == "localhost" else None
    if address.is_loopback:
        return "the loopback address"
    return "the unspecified address" if address.is_unspecified else None


@dataclass(frozen=True)
class NetworkConfig:
    """Where this peer listens, how others reach it, and which run it joins."""

    listen: str = setting(
        "127.0.0.1:7000",
        "HOST:PORT to listen on; port 0 picks a free one (the bound address is printed)",
        metavar="HOST:PORT",
    )
    advertise: str | None = setting(
        None,
        "URL other peers reach this one at (default: http://HOST:PORT of --listen)",
        kind=str,
        metavar="URL",
    )
    bootstrap: str | None = setting(
        None,
        "any peer of the run, e.g. http://10.0.0.5:7000 (none: start a new run)",
        kind=str,
        metavar="URL",
    )
    swarm_key: str | None = setting(
        None,
        "shared secret; every message is HMAC-signed with it (default: $SHOAL_SWARM_KEY)",
        kind=str,
        metavar="KEY",
    )
    peer_id: str = setting(
        None,
        "this peer's id (default: derived from its public key); also picks its data shard",
        kind=str,
        metavar="ID",
    )
    identity: str | None = setting(
        None,
        "this peer's Ed25519 key file, created (mode 0600) if missing (default: a key made "
        "in memory for this run)",
        kind=str,
        metavar="PATH",
    )
    allow_peers: str | None = setting(
        None,
        "file of public keys (hex or base64, one a line, # comments): only they may join",
        kind=str,
        metavar="FILE",
    )
    reachable: str = setting(
        "auto",
        "whether other peers can connect to this one: auto (the peer it joins dials it back), "
        "yes, or no (client mode: it is reached through two relay peers, README: Peers "
        "behind NAT)",
        choices=("auto", "yes", "no"),
    )
    swarm_id: str | None = None  # the first peer's choice; joiners adopt the swarm's (no flag)
    key: Identity | None = field(default=None, compare=False, repr=False)  # from --identity
    allowed_keys: frozenset[bytes] | None = None  # from --allow-peers

    def __post_init__(self) -> None:
        host, port = _host_port(self.listen)
        if not 0 <= port < 65536:
            raise ValueError(f"--listen port must be in 0..65535, got {port}")
        if self.bootstrap is not None and not self.bootstrap.startswith(("http://", "https://")):
            raise ValueError(
                f"--bootstrap must be a URL like http://host:port, got {self.bootstrap!r}"
            )
        if self.advertise is not None and not self.advertise.startswith(("http://", "https://")):
            raise ValueError(
                f"--advertise must be a URL like http://host:port, got {self.advertise!r}"
            )
        if self.reachable not in ("auto", "yes", "no"):
            raise ValueError(f"--reachable must be auto, yes or no, got {self.reachable!r}")
        if self.reachable == "no" and self.bootstrap is None:
            raise ValueError(
                "--reachable no needs --bootstrap: the first peer of a run is the one others "
                "join through, so it must accept connections"
            )
        # the identity, loaded once here: the peer id may be derived from it (frozen: set)
        key = self.key or (Identity.load_or_create(self.identity) if self.identity else None)
        key = key or Identity.generate()
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "peer_id", self.peer_id or key.derived_id)
        key.check_peer_id(self.peer_id)
        if self.allow_peers is not None and self.allowed_keys is None:
            object.__setattr__(self, "allowed_keys", load_allow_list(self.allow_peers))
        if not ID_PATTERN.fullmatch(self.peer_id):  # it travels in an envelope header
            raise ValueError("--peer-id must be 1..128 of the characters A-Z a-z 0-9 . _ ~ : @ + -")

    @property
    def listen_host(self) -> str:
        return _host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return _host_port(self.listen)[1]

    def open_warning(self) -> str | None:
        """Item 5 of issue 22: we listen where other machines can reach us, with neither a
        swarm key nor an allow-list, so anyone who finds the port can join and send."""
        if undialable(self.listen_host) == "the loopback address" or self.swarm_key:
            return None
        if self.allow_peers is not None:
            return None
        return (
            f"listening on {self.listen_host} with no --swarm-key and no --allow-peers: anyone "
            "who can reach this port can join the run, send contributions and read the model "
            '(README: "Running an open swarm")'
        )

    def loopback_warning(self) -> str | None:
        """Why others may not reach us: we advertise a loopback address to a run whose
        bootstrap is elsewhere (None when that is not the case, or with --reachable no)."""
        if self.bootstrap is None or self.reachable == "no":
            return None
        advertised = urlsplit(self.advertise).hostname if self.advertise else self.listen_host
        what = undialable(advertised or "")
        if what is None or undialable(urlsplit(self.bootstrap).hostname or ""):
            return None
        return (
            f"this peer advertises {what} {advertised} to a swarm at {self.bootstrap}: other "
            "machines cannot reach it (it will be reached through relays); pass --advertise "
            "http://PUBLIC_HOST:PORT (and --listen 0.0.0.0:PORT), or --reachable no"
        )


@dataclass(frozen=True)
class PipelineConfig:
    """This peer's place in a pipeline replica, and stage 0's routing of microbatches."""

    role: str = setting(
        "replica",
        "replica: a full model replica; stage: one stage of a pipeline replica (needs --stages)",
        choices=("replica", "stage"),
    )
    stage: int | None = setting(
        None,
        "--role stage: the stage to serve (default: the least served one in the "
        "swarm); stage 0 holds the data and drives the pipeline",
        kind=int,
    )
    standby: bool = setting(
        False,
        "--role stage: join and wait, serving nothing, until some stage loses "
        "every peer; then take it over, rebuilt from its neighbours (CheckFree), or for "
        "stage 0 copied from stage 1 (CheckFree+)",
    )
    activation: str = setting(
        "none",
        "activation codec of this pipeline replica: none, int8, subspace:RATIO, "
        "subspace-int8:RATIO or subspace-int4:RATIO (e.g. subspace-int4:32); on a full "
        "replica, a subspace setting trains it confined as such a replica would be",
        metavar="CODEC",
    )
    microbatch_size: int = setting(4, "stage 0: sequences per microbatch")
    in_flight: int = setting(4, "stage 0: microbatches in the pipeline at once")
    router: str = setting(
        "swarm",
        "stage 0: per-hop choice among a stage's peers (swarm: least projected busy time; random)",
        choices=("random", "swarm"),
    )
    skip_ratio: float = setting(
        0.0,
        "stage 0: SkipPipe: each microbatch skips this share of the stages on "
        "paths planned around slow peers (e.g. 0.33; 0: every stage)",
    )
    skip_swaps: int = setting(
        0,
        "stage 0: SkipPipe: most pairs of adjacent stages a path may run swapped "
        "(0: in order, which cost less loss in scripts/bench_skippipe.py; the paper "
        "allows 2)",
    )
    skip_keep: tuple[int, ...] = setting(
        (1,),
        "stage 0: SkipPipe: block stages every path visits, e.g. 1 "
        "or 1,5 (1: the first block stage; none: any may be skipped)",
        parse=stage_list("--skip-keep", none_ok=True),
        metavar="STAGES",
    )
    skip_rescale: str = setting(
        "sqrt",
        "stage 0: SkipPipe: a stage on a share p of the paths scales its "
        "residual update by p^-1/2 (sqrt) or 1/p (inverse) in training forwards; "
        "none: unscaled",
        choices=RESCALE_MODES,
    )
    out_of_order: float = setting(
        0.0,
        "stage 0: CheckFree+: this share of microbatches runs the first and "
        "last two block stages swapped, so a lost edge stage can be copied from "
        "its neighbour (e.g. 0.5)",
    )
    eval_stages: tuple[int, ...] | None = setting(
        None,
        "stage 0: also evaluate through only these block stages, e.g. 1,3,5",
        parse=stage_list("--eval-stages"),
        metavar="STAGES",
    )
    emulate_forward_ms: float = setting(
        0.0,
        "benchmarks: each training forward of this stage takes at "
        "least this many ms, each backward twice that",
        flag="--emulate-forward-ms",
    )

    def __post_init__(self) -> None:
        if self.role not in ("replica", "stage"):
            raise ValueError(f"--role must be replica or stage, got {self.role!r}")
        if self.standby and (self.role != "stage" or self.stage is not None):
            raise ValueError(
                "--standby is for --role stage without --stage: the stage is the one that gets lost"
            )
        if self.microbatch_size < 1 or self.in_flight < 1:
            raise ValueError("--microbatch-size and --in-flight must be >= 1")
        if not 0.0 <= self.emulate_forward_ms <= 60_000:
            raise ValueError(
                f"--emulate-forward-ms must be in [0, 60000], got {self.emulate_forward_ms}"
            )
        if self.skip_swaps < 0:
            raise ValueError(f"--skip-swaps must be >= 0, got {self.skip_swaps}")
        if self.skip_rescale not in RESCALE_MODES:
            raise ValueError(
                f"--skip-rescale must be one of {', '.join(RESCALE_MODES)}, got "
                f"{self.skip_rescale!r}"
            )
        if not 0.0 <= self.skip_ratio < 1.0:
            raise ValueError(f"--skip-ratio must be in [0, 1), got {self.skip_ratio}")
        if not 0.0 <= self.out_of_order <= 1.0:
            raise ValueError(f"--out-of-order must be in [0, 1], got {self.out_of_order}")

    def check_against(self, run: RunConfig) -> None:
        """What depends on the run's number of stages."""
        stages = run.stages
        if self.role == "stage" and not stages:
            raise ValueError(
                "--role stage needs a pipelined run: --stages S (S >= 2) on every peer"
            )
        if self.stage is not None and not 0 <= self.stage < max(stages, 1):
            raise ValueError(f"--stage must be in 0..{stages - 1}, got {self.stage}")
        if self.skip_ratio and (
            len(set(self.skip_keep)) < len(self.skip_keep)
            or not all(1 <= s < stages for s in self.skip_keep)
        ):
            raise ValueError(
                f"--skip-keep must list distinct block stages in 1..{stages - 1}, "
                f"got {list(self.skip_keep)}"
            )
        if self.skip_ratio and stages:
            visits = SkipPipeConfig(num_stages=stages, skip_ratio=self.skip_ratio).visits_per_path
            if len(self.skip_keep) > visits - 1:
                raise ValueError(
                    f"--skip-keep keeps {len(self.skip_keep)} stages, but with --skip-ratio "
                    f"{self.skip_ratio} a path visits only {visits - 1} block stages"
                )
        if self.eval_stages is not None and (
            not self.eval_stages
            or len(set(self.eval_stages)) < len(self.eval_stages)
            or not all(1 <= s < stages for s in self.eval_stages)
        ):
            raise ValueError(
                f"--eval-stages must list distinct block stages in 1..{stages - 1}, "
                f"got {list(self.eval_stages) if self.eval_stages is not None else None}"
            )


SECTIONS: dict[str, type] = {
    "network": NetworkConfig,
    "pipeline": PipelineConfig,
    "data": DataConfig,
    "schedule": ScheduleConfig,
    "protocol": ProtocolConfig,
}


@dataclass(frozen=True)
class PeerConfig:
    """One peer process's settings."""

    run: RunConfig
    files: RunFiles = field(default_factory=RunFiles)  # this peer's copies of the run's files
    network: NetworkConfig = field(default_factory=NetworkConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)

    def __post_init__(self) -> None:
        self.pipeline.check_against(self.run)
        nproc = self.schedule.nproc
        if nproc > 1 and self.run.inner.batch_size % nproc:
            raise ValueError(
                f"--batch-size {self.run.inner.batch_size} must be a multiple of --nproc {nproc}"
            )
        if nproc > 1 and (self.pipeline.role != "replica" or self.pipeline.standby):
            raise ValueError("--nproc > 1 is for full replicas (pipeline stages: not yet)")

    @property
    def peer_id(self) -> str:
        return self.network.peer_id

    @classmethod
    def of(
        cls,
        run: RunConfig,
        protocol: ProtocolConfig | None = None,
        files: RunFiles | None = None,
        **settings: Any,
    ) -> PeerConfig:
        """A PeerConfig from flat keywords, each placed in the section that has it (for
        tests and scripts): `PeerConfig.of(run, peer_id="a", role="stage", max_rounds=3)`.
        `listen_host`/`listen_port` set `listen` (default 127.0.0.1:0); `data_path` is
        `data.path`."""
        by_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        # in code (tests, scripts) a peer listens on a free port unless told otherwise
        host, port = settings.pop("listen_host", "127.0.0.1"), settings.pop("listen_port", 0)
        by_section["network"]["listen"] = f"{host}:{port}"
        if "data_path" in settings:
            by_section["data"]["path"] = settings.pop("data_path")
        for key, value in settings.items():
            owners = [
                name
                for name, section in SECTIONS.items()
                if key in {f.name for f in fields(section)}
            ]
            if not owners:
                raise TypeError(f"no config section has a setting {key!r}")
            by_section[owners[0]][key] = value
        sections = {
            name: SECTIONS[name](**values)
            for name, values in by_section.items()
            if name != "protocol"
        }
        if by_section["protocol"]:
            protocol = ProtocolConfig(
                **{**asdict(protocol or ProtocolConfig()), **by_section["protocol"]}
            )
        return cls(
            run=run, files=files or RunFiles(), protocol=protocol or ProtocolConfig(), **sections
        )
