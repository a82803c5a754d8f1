"""`/metrics`: the swarm snapshot in Prometheus text exposition format 0.0.4.

Every label value came from the network and is escaped (`_label`); every sample goes
through `_sample`, which writes only finite reals (NaN for anything else).
"""

from __future__ import annotations

import numbers
from typing import Any

from shoal.peer.dashboard_format import _real, _state


def _label(value: Any) -> str:
    """Prometheus label value escaping: backslash, double quote, newline."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(value: Any) -> str:
    return str(int(value)) if isinstance(value, numbers.Integral) else repr(float(value))


PEER_METRICS = [
    ("shoal_peer_round", "round", "gauge", "Outer rounds applied by the peer."),
    ("shoal_peer_step", "step", "gauge", "Inner steps taken by the peer."),
    (
        "shoal_peer_train_loss",
        "train_loss",
        "gauge",
        "Mean training loss of the peer's last inner phase (nats).",
    ),
    (
        "shoal_peer_eval_loss",
        "eval_loss",
        "gauge",
        "Held-out loss after the peer's last outer step (nats).",
    ),
    ("shoal_peer_tokens_per_second", "tokens_per_s", "gauge", "Training throughput of the peer."),
    ("shoal_peer_bytes_sent_total", "bytes_sent", "counter", "Body bytes the peer sent."),
    (
        "shoal_peer_bytes_received_total",
        "bytes_received",
        "counter",
        "Body bytes the peer received.",
    ),
    (
        "shoal_peer_partner_distance",
        "partner_distance",
        "gauge",
        "NoLoCo: RMS distance of the peer's slow weights to its last partner's.",
    ),
]


def render_metrics(snapshot: dict[str, Any]) -> str:
    """Prometheus text format 0.0.4; samples whose value is missing, NaN or not a number are
    left out."""
    peers = [p for p in snapshot.get("peers") or [] if isinstance(p, dict)]
    run = snapshot.get("run") if isinstance(snapshot.get("run"), dict) else {}
    dead = sum(1 for p in peers if _state(p) == "dead")

    def family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
        return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples] if samples else []

    info = {
        "swarm_id": snapshot.get("swarm_id", ""),
        "peer": snapshot.get("self_id", ""),
        **{k: run.get(k, "") for k in ("model", "outer", "codec")},
    }
    info_labels = ",".join(f'{k}="{_label(v)}"' for k, v in info.items())
    lines = family(
        "shoal_peers",
        "gauge",
        "Peers in this peer's table, by state.",
        [
            f'shoal_peers{{state="alive"}} {len(peers) - dead}',
            f'shoal_peers{{state="dead"}} {dead}',
        ],
    )
    lines += family(
        "shoal_round",
        "gauge",
        "Outer rounds applied by this peer.",
        [f"shoal_round {_sample(snapshot['round'])}"] if _real(snapshot.get("round")) else [],
    )
    lines += family(
        "shoal_run_info",
        "gauge",
        "Run this peer belongs to (always 1).",
        [f"shoal_run_info{{{info_labels}}} 1"],
    )
    lines += family(
        "shoal_peer_alive",
        "gauge",
        "1 if the peer is alive (or suspect) in this peer's view.",
        [
            f'shoal_peer_alive{{peer="{_label(p.get("peer_id", ""))}"}} {int(_state(p) != "dead")}'
            for p in peers
        ],
    )
    own_lag_s = snapshot.get("loop_lag_s_max")
    lines += family(
        "shoal_loop_lag_seconds_max",
        "gauge",
        "Longest this peer's event loop ran late over the last 60 s.",
        [f"shoal_loop_lag_seconds_max {_sample(float(own_lag_s))}"] if _real(own_lag_s) else [],
    )
    failures = snapshot.get("task_failures")
    lines += family(
        "shoal_task_failures_total",
        "gauge",  # the peer keeps only its latest failures: the count can stop growing
        "Failed background tasks of this peer on record.",
        [f"shoal_task_failures_total {len(failures) if isinstance(failures, list) else 0}"],
    )
    lines += family(
        "shoal_peer_loop_lag_seconds_max",
        "gauge",
        "Longest each peer's event loop ran late over the last 60 s, as it gossips.",
        [
            f'shoal_peer_loop_lag_seconds_max{{peer="{_label(p.get("peer_id", ""))}"}} '
            f"{_sample(float(p['loop_lag_ms_max']) / 1000)}"
            for p in peers
            if _real(p.get("loop_lag_ms_max"))
        ],
    )
    for name, key, kind, help_text in PEER_METRICS:
        lines += family(
            name,
            kind,
            help_text,
            [
                f'{name}{{peer="{_label(p.get("peer_id", ""))}"}} {_sample(p[key])}'
                for p in peers
                if _real(p.get(key))
            ],
        )
    return "\n".join(lines) + "\n"
