"""A peer: the thin part that builds the others, wires them and owns their lifetimes.

    TrainingThread   torch work, one job at a time          (peer/trainthread.py)
    MembershipAgent  join, gossip, liveness; behind NAT: relays  (agent.py, tunnel.py)
    Role             what this peer trains and serves       (peer/roles.py)
    RoundEngine      the outer rounds                       (peer/engine.py, peer/rounds.py)
    StatePublisher   snapshots served and checkpointed      (peer/publisher.py)
    StageRecovery    CheckFree: lost pipeline stages        (peer/recovery.py)
    TaskOwner        every background task, and its errors  (peer/tasks.py)
    LoopLagMonitor   how late the event loop runs           (peer/looplag.py)
    the HTTP app     thin handlers over the parts above     (peer/server.py)

Life of a peer: load the data → serve (port 0 is fine: the bound port is reported) →
join through `--bootstrap` (run config checked, peer table taken) or found a run → a stage
peer picks its stage (or a standby waits for one to be lost) → build the role's model →
catch up with the swarm's outer state (or rebuild a lost stage) → gossip and train round
after round → on stop, serve until the others finish the round, at most `linger_s`.
The event loop only waits: torch work runs on the training thread, byte work in executors.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from shoal.peer.agent import MembershipAgent
from shoal.peer.client import PeerClient, Traffic
from shoal.peer.config import PeerConfig
from shoal.peer.engine import RoundEngine
from shoal.peer.errors import ConfigMismatch
from shoal.peer.holders import NEVER, choose_stage
from shoal.peer.identity import CryptoClock
from shoal.peer.limits import request_limit_bytes
from shoal.peer.looplag import LoopLagMonitor
from shoal.peer.membership import Membership, PeerInfo
from shoal.peer.publisher import StatePublisher
from shoal.peer.recovery import StageRecovery
from shoal.peer.roles import PeerContext, Progress, Role, make_role
from shoal.peer.roundstore import RoundStore
from shoal.peer.runconfig import tokenizer_ref
from shoal.peer.runfiles import RunDefinition, keep_tokenizer, run_answer
from shoal.peer.server import make_app
from shoal.peer.statesync import StateServer
from shoal.peer.tasks import TaskOwner
from shoal.peer.trainthread import TrainingThread
from shoal.peer.tunnel import RelayTunnel, join_swarm
from shoal.peer.wire import WireCodec
from shoal.pipeline.service import StageService
from shoal.train import build_model, load_data, load_tokenizer, resolve_device
from shoal.train.memory import MemoryLine, format_plan, memory_plan

log = logging.getLogger(__name__)


class Peer:
    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.peer_id = config.peer_id
        protocol = config.protocol
        self.max_request_bytes = request_limit_bytes(config)
        self.traffic = Traffic()
        self.wire = WireCodec(
            config.peer_id,
            config.network.swarm_id or secrets.token_hex(8),
            config.network.swarm_key,
            max_body_bytes=self.max_request_bytes,
            compress_above_bytes=protocol.compress_above_bytes,
            max_clock_skew_s=protocol.max_clock_skew_s,
            identity=config.network.key,
            allowed=config.network.allowed_keys,
        )
        self.client = PeerClient(
            self.wire,
            self.traffic,
            request_timeout_s=protocol.request_timeout_s,
            max_response_bytes=protocol.max_response_bytes,
        )
        self.store = RoundStore(protocol.rounds_kept)
        self.state_server = StateServer(protocol.state_chunk_bytes, protocol.state_serve_timeout_s)
        self.tasks = TaskOwner(self.peer_id, on_fatal=self._fail)
        self.thread = TrainingThread(self.peer_id, config.schedule.compute_nice)
        self.loop_lag = LoopLagMonitor()
        self.progress = Progress()
        self.publisher = StatePublisher(
            self.peer_id,
            self.state_server,
            self.tasks,
            config.schedule.checkpoint_dir,
            {"run": config.run.to_dict(), "peer": self.peer_id},
        )
        self.address = ""
        self.definition = RunDefinition(config.run)  # with the data's manifest once loaded
        self.run_answer: dict[str, Any] | None = None  # `POST /run`, once the data is loaded
        self.finished = asyncio.Event()
        self.error: BaseException | None = None  # what ended the training, if not a stop
        self.agent: MembershipAgent | None = None  # after start(): our address is known then
        self.tunnel: RelayTunnel | None = None  # client mode: reached through relays
        self.role: Role | None = None
        self.engine: RoundEngine | None = None
        self._runner: web.AppRunner | None = None

    # ---- what the server and the dashboard read ----------------------------------------

    @property
    def outer_round(self) -> int:
        return self.progress.round

    @property
    def membership(self) -> Membership:
        assert self.agent is not None, "the peer has not started"
        return self.agent.membership

    @property
    def stage_service(self) -> StageService | None:
        return self.role.stage_service if self.role is not None else None

    @property
    def round_log(self) -> list[dict[str, Any]]:
        return self.engine.round_log if self.engine is not None else []

    # ---- lifecycle -------------------------------------------------------------------

    async def start(
        self, train: bool = True, on_serving: Callable[[str], None] | None = None
    ) -> None:
        """Serve, join or found the run, build the model and start training (unless `train`
        is False: then the peer only serves and gossips). `on_serving(address)` is called
        as soon as the server is bound and answers (before the model is built; a standby
        gets there long before it serves a stage)."""
        config, protocol = self.config, self.config.protocol
        data = await self.thread.run(self._load_data)
        # measured from here: from now on the loop serves (or is about to)
        self.tasks.spawn(self.loop_lag.run(), name="loop-lag monitor")
        self._runner = web.AppRunner(make_app(self, self.max_request_bytes), access_log=None)
        await self._runner.setup()
        network = config.network
        site = web.TCPSite(self._runner, network.listen_host, network.listen_port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.address = network.advertise or f"http://{network.listen_host}:{port}"
        me = PeerInfo(
            self.peer_id,
            self.address,
            config.pipeline.role,
            incarnation=time.time(),
            stage=config.pipeline.stage,
        )
        self.agent = MembershipAgent(
            me,
            config.run,
            protocol,
            self.client,
            self.wire,
            self.tasks,
            lambda: self.progress.round,
            self._refresh_entry,
        )
        if on_serving is not None:
            on_serving(self.address)
        recovery = StageRecovery(
            self.agent,
            self.client,
            config.run,
            config.pipeline.activation,
            protocol,
            self.thread.stopping,
        )
        await self.client.start()
        joined_round, self.tunnel = await join_swarm(self.agent, network, self.tasks, port)
        if config.pipeline.standby:  # stay known, and wait for a stage to be lost
            me.first_round = NEVER
            self.tasks.spawn(self.agent.gossip_forever(), name="gossip", fatal=True)
            log.info(
                "[%s] standing by to take over a pipeline stage that loses every peer", self.peer_id
            )
            # the first model build imports about a second of torch internals: pay it now
            await self.thread.run(build_model, config.run.model_config(), config.run.seed, "meta")
            me.stage = await recovery.wait_for_lost_stage()
            log.warning("[%s] stage %d lost every peer: taking it over", self.peer_id, me.stage)
        elif config.pipeline.role == "stage" and me.stage is None:
            me.stage = choose_stage(self.agent.membership, config.run.stages)
            log.info("[%s] serving pipeline stage %d (the least served)", self.peer_id, me.stage)
        ctx = PeerContext(
            config,
            self.client,
            self.agent,
            self.thread,
            self.tasks,
            self.publisher,
            recovery,
            self.progress,
            *data,
        )
        self.role = make_role(ctx, me.stage)
        self.engine = RoundEngine(ctx, self.role, self.store, self.wire)
        await self.thread.run(self.engine.build)
        me.devices = self.role.devices()
        if self.device.type == "cuda":  # the outer state stays in CPU memory, pinned
            await self.thread.run(self.engine.outer.pin_memory)
        log.info("[%s] memory plan:\n%s", self.peer_id, format_plan(self._memory_plan()))
        # the run has moved on from the shared initial weights (a standby's gossiped view of
        # the round lags: it always asks), or they are --init-from's files, which we lack
        moved_on = joined_round > 0 or config.pipeline.standby
        if moved_on or (config.run.init is not None and config.files.init_from is None):
            await self.engine.catch_up()
        else:
            self.engine.publish_snapshot(await self.thread.run(self.engine.snapshot))
        if config.pipeline.role == "stage":  # built and in step: drivers may route to us now
            me.activation = config.pipeline.activation
        me.round = me.first_round = self.outer_round
        me.eval_loss = self.engine.initial_eval_loss = await self.thread.run(self.engine.evaluate)
        self.agent.beat()
        serving = (self.peer_id, self.address, self.wire.swarm_id, self.outer_round)
        log.info("[%s] serving %s (swarm %s, round %d)", *serving)
        if config.pipeline.standby:  # tell everyone at once rather than at the next heartbeats
            await self.agent.announce()
        else:
            self.tasks.spawn(self.agent.gossip_forever(), name="gossip", fatal=True)
        if train:
            self.tasks.spawn(self._train(), name="training", fatal=True)

    def _load_data(self) -> tuple[Any, Any, Any]:
        """(device, training batches, held-out batches): training thread."""
        import torch
        import torch._dynamo  # noqa: F401 - see below

        # torch imports its compiler stack (most of a second of module code that holds the
        # interpreter) with the first optimizer: pay for it here, before the peer serves
        config, run = self.config, self.config.run
        if config.schedule.torch_threads:
            torch.set_num_threads(config.schedule.torch_threads)
        device = resolve_device(config.schedule.device)
        tokenizer = load_tokenizer(config.files.tokenizer)
        if tokenizer_ref(tokenizer) != run.tokenizer:
            raise ConfigMismatch(
                f"--tokenizer {config.files.tokenizer or 'bytes'} is not the run's tokenizer "
                f"({run.tokenizer})"
            )
        data = load_data(config.data.path, tokenizer, num_shards=config.data.num_shards)
        self.definition = RunDefinition(run, data.manifest_sha256)
        self.run_answer = run_answer(self.definition, config.files.tokenizer)
        if config.schedule.checkpoint_dir and self.run_answer["tokenizer"] is not None:
            # `shoal export` finds it there
            keep_tokenizer(self.run_answer["tokenizer"], config.schedule.checkpoint_dir)
        batches = data.train_batches(
            self.peer_id, run.inner.batch_size, run.inner.seq_len, seed=run.seed
        )
        eval_set = data.eval_batches(
            run.inner.batch_size, run.inner.seq_len, config.data.eval_batches
        )
        self.device = device
        return device, batches, eval_set

    def _memory_plan(self) -> list[MemoryLine]:
        engine, inner = self.engine, self.config.run.inner
        assert engine is not None and engine.trainer is not None
        state = engine.outer.state_tensors()
        return memory_plan(
            engine.model_config,
            sum(p.numel() for p in engine.trainer.params.values()),
            inner.batch_size,
            inner.seq_len,
            str(self.device),
            self.config.schedule.checkpoint_activations,
            engine.outer.memory_bytes(),
            sum(t.nbytes for t in state.values()),
        )

    def _refresh_entry(self, me: PeerInfo) -> None:
        """Our table entry's counters, fresh for each heartbeat."""
        me.bytes_sent, me.bytes_received = self.traffic.bytes_sent, self.traffic.bytes_received
        lag_ms = 1000 * self.loop_lag.max_lag_s()
        me.loop_lag_ms_max = lag_ms if math.isfinite(lag_ms) else None

    async def _train(self) -> None:
        assert self.engine is not None
        await self.engine.run()
        self.finished.set()

    def _fail(self, task: str, exc: BaseException) -> None:
        """A task the peer cannot go on without failed: stop training, report the error."""
        log.error("[%s] stopping: %s failed: %s", self.peer_id, task, exc)
        if self.error is None:
            self.error = exc
        self.thread.stopping.set()
        self.finished.set()

    async def stop(self) -> None:
        self.thread.stopping.set()
        await self.tasks.close()
        await self.client.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.thread.close()
        if self.role is not None:
            self.role.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.publisher.close)  # last checkpoint

    async def run_until_done(self) -> None:
        """Train until `--rounds` (or forever), then serve until every live peer reached our
        round (they may need our set and hash), at most `linger_s`; our round is news now."""
        await self.finished.wait()
        self.membership.revise(force=True)
        if self.error is not None:
            raise RuntimeError(
                f"peer {self.peer_id} stopped on an error: {self.error}"
            ) from self.error
        protocol = self.config.protocol
        deadline = time.monotonic() + protocol.linger_s
        while time.monotonic() < deadline:
            if all(p.round >= self.outer_round for p in self.membership.live_others()):
                await asyncio.sleep(2 * protocol.heartbeat_interval_s)  # their last requests
                return
            await asyncio.sleep(0.2)

    # ---- dashboard -------------------------------------------------------------------

    def swarm_snapshot(self) -> dict[str, Any]:
        membership = self.membership
        peers = []
        for pid, info in sorted(membership.peers.items()):
            entry = info.to_wire()
            entry["status"] = membership.status(pid)
            entry["alive"] = entry["status"] != "dead"
            quiet_s = membership.clock() - membership.last_change.get(pid, 0.0)
            entry["last_seen"] = time.time() - quiet_s
            entry["left_out"] = self.engine.exchange.flagged.get(pid) if self.engine else None
            peers.append(entry)
        run = self.config.run
        history = {
            pid: [{"round": r, **v} for r, v in sorted(rounds.items())]
            for pid, rounds in membership.history.items()
        }
        return {
            "swarm_id": self.wire.swarm_id,
            "self_id": self.peer_id,
            "now": time.time(),
            "run": {
                "model": run.model_preset,
                "definition": self.definition.to_dict(),
                "definition_sha256": self.definition.sha256(),
                "outer": run.outer.name,
                "codec": run.outer.codec,
                "inner_steps": run.inner_steps,
                "params": self.param_count(),
            },
            "round": self.outer_round,
            "pipeline": self.role.pipeline_view() if self.role is not None else None,
            "peers": peers,
            "history": history,
            "traffic": {"sent": dict(self.traffic.sent), "received": dict(self.traffic.received)},
            "loop_lag_s_max": self.loop_lag.max_lag_s(),
            "task_failures": self.tasks.failures,
            "identity": CryptoClock.as_dict(),  # this process's signing and verifying
        }

    def param_count(self) -> int | None:
        """Parameters this peer holds (None before its model is built, e.g. a standby)."""
        outer = self.engine.outer if self.engine is not None else None
        return sum(t.numel() for t in outer.params.values()) if outer is not None else None

    def report(self) -> dict[str, Any]:
        """The peer's run as JSON-able data (`--report`, the demo's summary)."""
        engine = self.engine
        data = {
            "peer_id": self.peer_id,
            "address": self.address,
            "round": self.outer_round,
            "rounds": self.round_log,
            "initial_eval_loss": engine.initial_eval_loss if engine else None,
            "bytes_sent": self.traffic.bytes_sent,
            "bytes_received": self.traffic.bytes_received,
            "bytes_sent_by_kind": dict(self.traffic.sent),
            "bytes_received_by_kind": dict(self.traffic.received),
            "params": self.param_count(),
            "inner_steps_total": engine.trainer.step_count if engine and engine.trainer else 0,
            "train_started_at": engine.train_started_at if engine else None,
            "finished_at": time.time(),
            "inner_seconds_total": engine.inner_seconds_total if engine else 0.0,
            "longest_stall_s": engine.longest_stall_s if engine else 0.0,
            "eval_seconds_total": engine.eval_seconds_total if engine else 0.0,
            "role": self.config.pipeline.role,
            "stage": self.agent.me.stage if self.agent else None,
            "loop_lag_s_max": self.loop_lag.max_lag_s(),
            "task_failures": self.tasks.failures,
            "identity": CryptoClock.as_dict(),  # this process's signing and verifying
        }
        if self.role is not None:
            data.update(self.role.report())
        return data
