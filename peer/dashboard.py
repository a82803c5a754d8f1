"""The swarm dashboard, rendered from one snapshot dict (what `/api/swarm` returns).

Pure functions, no I/O (not even the clock: ages are relative to `snapshot["now"]`):
- `render_html`: one self-contained page (inline CSS, inline SVG chart, no resource from
  anywhere, so it works offline and leaks nothing). Every few seconds a tiny inline
  script re-fetches the page itself and swaps the body in: the server stays the only
  renderer, and an unreachable peer leaves the last view up and retries, where a
  `<meta refresh>` would strand the browser on an error page (it remains as the
  `<noscript>` fallback).
- `render_metrics`: Prometheus text exposition format 0.0.4.

Besides each peer's table entry, the snapshot may carry this peer's own health: the worst
event-loop lag over the last 60 s (`loop_lag_s_max`; every peer also gossips its own as
`loop_lag_ms_max`, see `peer/looplag.py`) and the background tasks that failed
(`task_failures`: {"task", "error", "time"}, see `peer/tasks.py`).

Every string in a snapshot came from the network (peer ids, addresses, roles, run
config), so each one is escaped where it is written; numbers go through `_fmt`, which
prints only finite reals, so a string or NaN where a number belongs shows as "–".
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from shoal.peer.dashboard_chart import colours, render_chart
from shoal.peer.dashboard_format import (
    DASH,
    _ago,
    _fmt,
    _real,
    _run_value,
    _state,
    _text,
    human_bytes,
)
from shoal.peer.runconfig import flatten

REFRESH_S = 3
LOOP_LAG_WARN_MS = 100.0  # display only: a loop that held this long delays heartbeats visibly
SHOWN_FAILURES = 20  # the newest task failures listed on the page
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;background:#f7f7f8}
h1{font-size:20px;margin:0 0 2px}h2{font-size:16px;margin:22px 0 6px}.sub{color:#666}
code{font:12px ui-monospace,monospace}a{color:#1f5fa8}.muted{color:#888;font-size:12px}
.cards{display:flex;gap:10px;flex-wrap:wrap;margin:14px 0 6px}
.card{background:#fff;border:1px solid #e2e2e6;border-radius:6px;padding:6px 14px;color:#666}
.card b{display:block;font-size:17px;color:#222}.bad{color:#c62828}.warn{color:#ef6c00}
.scroll{overflow-x:auto}
table{border-collapse:collapse;background:#fff;border:1px solid #e2e2e6;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f0f0f3;font-weight:600}.l{text-align:left}
tr.dead td{color:#aaa}td.st{font-weight:600;color:#2e7d32}tr.suspect td.st{color:#ef6c00}
tr.dead td.st{color:#c62828}tr.dead td.st::before{content:"✕ "}tr.me{background:#f3f8ff}
td.drift{background:#ffe0e0}td.drift code{color:#b71c1c;font-weight:700}
td.wrap{white-space:normal;max-width:60em;text-align:left}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
svg{background:#fff;border:1px solid #e2e2e6;border-radius:6px;max-width:100%;height:auto}
"""
# Re-fetch this page and swap the body in; scripts inside innerHTML never run.
SCRIPT = f"""<script>setInterval(()=>{{if(document.hidden)return;
fetch(location.href,{{cache:"no-store"}}).then(r=>{{if(!r.ok)throw r.status;return r.text()}})
.then(t=>{{document.body.innerHTML=new DOMParser().parseFromString(t,"text/html").body.innerHTML}})
.catch(()=>{{const e=document.getElementById("live");
if(e)e.textContent="peer unreachable, retrying"}})}},{REFRESH_S * 1000});
</script>"""


def odd_hashes(peers: list[dict[str, Any]]) -> set[str]:
    """Weights hashes of live peers that differ from the majority; all of them on a tie.

    Replicas must stay bit-identical, so any difference is worth a red cell; with no
    strict majority there is no "right" hash to trust, so every one is flagged.
    """
    odd: set[str] = set()
    slices: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in peers:  # a pipeline stage peer holds one stage's slice: compare like with like
        slices.setdefault(
            (str(p.get("role")), str(p.get("stage")) if p.get("role") == "stage" else ""), []
        ).append(p)
    for group in slices.values():
        counts = Counter(
            str(p["weights_hash"]) for p in group if _state(p) != "dead" and p.get("weights_hash")
        )
        ranked = counts.most_common()
        if len(ranked) < 2:
            continue
        odd |= set(counts) if ranked[0][1] == ranked[1][1] else set(counts) - {ranked[0][0]}
    return odd


def weights_spread(peers: list[dict[str, Any]]) -> str:
    """NoLoCo replicas differ by design: the swarm's spread is the RMS distance of the live
    peers' slow weights to their last partners' (mean and max over peers)."""
    distances = [
        float(p["partner_distance"])
        for p in peers
        if _state(p) != "dead" and _real(p.get("partner_distance"))
    ]
    if not distances:
        return DASH
    mean, worst = _fmt(sum(distances) / len(distances), ".2e"), _fmt(max(distances), ".2e")
    return f'spread {mean} <span class="muted">max {worst}</span>'


def stage_map(peers: list[dict[str, Any]], pipeline: Any) -> str:
    """One row per pipeline stage: what it holds, the live peers serving it (with their
    activation codec) and their summed throughput; a stage nobody serves is a red gap."""
    if (
        not isinstance(pipeline, dict)
        or not _real(pipeline.get("stages"))
        or pipeline["stages"] < 2
    ):
        return ""
    holds = pipeline.get("holds") if isinstance(pipeline.get("holds"), list) else []
    rows = []
    for stage in range(int(min(pipeline["stages"], 64))):
        serving = [
            p
            for p in peers
            if p.get("role") == "stage" and p.get("stage") == stage and _state(p) != "dead"
        ]
        names = ", ".join(
            f"<code>{_text(p.get('peer_id'))}</code> "
            f'<span class="muted">{_text(p.get("activation"))}</span>'
            for p in serving
        )
        speed = sum(float(p["tokens_per_s"]) for p in serving if _real(p.get("tokens_per_s")))
        what = _text(holds[stage]) if stage < len(holds) else DASH
        rows.append(
            f'<tr><td>{stage}</td><td class="l">{what}</td>'
            f'<td class="l">{names or "<span class=bad>gap: no live peer</span>"}</td>'
            f"<td>{len(serving)}</td><td>{_fmt(speed, ',.0f') if serving else DASH}</td></tr>"
        )
    head = (
        '<tr><th>stage</th><th class="l">holds</th><th class="l">peers · activation codec</th>'
        "<th>peers</th><th>tokens/s</th></tr>"
    )
    notes = []
    standby = [
        p
        for p in peers
        if p.get("role") == "stage" and p.get("stage") is None and _state(p) != "dead"
    ]
    if standby:
        notes.append(
            "standing by to take over a lost stage: "
            + ", ".join(f"<code>{_text(p.get('peer_id'))}</code>" for p in standby)
        )
    routes = pipeline.get("routes")
    if isinstance(routes, dict):
        notes.append(
            "this peer's routes: "
            + ", ".join(f"{_text(k)} {_text(v)}" for k, v in routes.items() if v is not None)
        )
    extra = "".join(f'<p class="muted">{n}</p>' for n in notes)
    table = f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>'
    return f"<h2>pipeline stages</h2>{table}{extra}"


def _address(p: dict[str, Any]) -> str:
    """A peer's address, or for a peer behind NAT (`peer.tunnel`) who relays it."""
    if not p.get("relayed_by"):
        return _text(p.get("address"))
    relays = ", ".join(_text(r) for r in str(p["relayed_by"]).split(","))
    return f'<span title="{_text(p.get("address"))}">behind NAT · relayed by {relays}</span>'


def _peer_row(
    p: dict[str, Any],
    now: Any,
    self_id: Any,
    odd: set[str],
    palette: dict[str, str],
    pairwise: bool = False,
) -> str:
    state, pid = _state(p), str(p.get("peer_id", ""))
    weights_hash = str(p.get("weights_hash") or "")
    drift = (
        ' class="drift" title="differs from the majority"'
        if weights_hash in odd and state != "dead"
        else ""
    )
    swatch = f'<span class="sw" style="background:{palette[pid]}"></span>' if pid in palette else ""
    me = pid == str(self_id)
    role_detail = f" {_fmt(p.get('stage'), '.0f')}" if p.get("role") == "stage" else ""
    if p.get("devices"):
        role_detail += f' <span class="muted">· {_text(p.get("devices"))}</span>'
    cells = [
        f'<td class="l">{swatch}<code>{_text(pid)}</code>{" (this peer)" if me else ""}</td>',
        f'<td class="l">{_address(p)}</td>',
        f'<td class="l">{_text(p.get("role"))}{role_detail}</td>',
        f"<td>{_fmt(p.get('round'), '.0f')}</td><td>{_fmt(p.get('step'), '.0f')}</td>",
        f"<td>{_fmt(p.get('train_loss'))}</td><td>{_fmt(p.get('eval_loss'))}</td>",
        f"<td>{_fmt(p.get('tokens_per_s'), ',.0f')}</td>",
        f"<td>{human_bytes(p.get('bytes_sent'))}</td><td>{human_bytes(p.get('bytes_received'))}</td>",
        _loop_lag_cell(p.get("loop_lag_ms_max")),
        f'<td>{_ago(now, p.get("last_seen"))}</td><td class="st l">{state}{_left_out(p)}</td>',
        f"<td{drift}><code>{_text(weights_hash[:8])}</code></td>",
    ]
    if pairwise:
        cells.append(
            f'<td class="l"><code>{_text(p.get("partner"))}</code> '
            f"{_fmt(p.get('partner_distance'), '.2e')}</td>"
        )
    return f'<tr class="{state}{" me" if me else ""}">{"".join(cells)}</tr>'


def _left_out(p: dict[str, Any]) -> str:
    """Why this peer's contributions were left out of a round by us (implausible sets)."""
    why = p.get("left_out")
    return f' <span class="bad">· left out: {_text(why)}</span>' if why else ""


def _loop_lag_cell(lag_ms: Any) -> str:
    """A peer's worst event-loop lag (ms) as gossiped; orange past `LOOP_LAG_WARN_MS`."""
    if not _real(lag_ms):
        return f"<td>{DASH}</td>"
    late = ' class="warn" title="its event loop was held"' if lag_ms > LOOP_LAG_WARN_MS else ""
    return f"<td{late}>{_fmt(lag_ms, ',.0f')} ms</td>"


def task_failures(snapshot: dict[str, Any]) -> str:
    """This peer's failed background tasks, newest first; nothing when there are none."""
    failures = snapshot.get("task_failures")
    rows = [f for f in failures if isinstance(f, dict)] if isinstance(failures, list) else []
    if not rows:
        return ""
    shown = [
        f'<tr><td class="l"><code>{_text(f.get("task"))}</code></td>'
        f'<td class="wrap">{_text(f.get("error"))}</td>'
        f"<td>{_ago(snapshot.get('now'), f.get('time'))}</td></tr>"
        for f in reversed(rows[-SHOWN_FAILURES:])
    ]
    head = '<tr><th class="l">task</th><th class="l">error</th><th>when</th></tr>'
    older = len(rows) - len(shown)
    more = f'<p class="muted">and {older} older</p>' if older else ""
    return (
        f'<h2 class="bad">failed background tasks of this peer ({len(rows)})</h2>'
        f'<div class="scroll"><table>{head}{"".join(shown)}</table></div>{more}'
    )


def run_definition(run: dict[str, Any]) -> str:
    """The run definition a joiner receives (`POST /run`), folded: one row per setting."""
    definition = run.get("definition")
    if not isinstance(definition, dict):
        return ""
    rows = "".join(
        f'<tr><td class="l"><code>{_text(k)}</code></td><td class="l">{_run_value(v)}</td></tr>'
        for k, v in sorted(flatten(definition).items())
    )
    digest = str(run.get("definition_sha256") or "")[:16]
    return (
        f"<details><summary>run definition <code>{_text(digest)}</code></summary>"
        f'<div class="scroll"><table>{rows}</table></div></details>'
    )


def render_html(snapshot: dict[str, Any]) -> str:
    """The whole dashboard page for one snapshot; safe with hostile strings in it."""
    peers = [p for p in snapshot.get("peers") or [] if isinstance(p, dict)]
    run = snapshot.get("run") if isinstance(snapshot.get("run"), dict) else {}
    history = snapshot.get("history") if isinstance(snapshot.get("history"), dict) else {}
    palette = colours([str(p.get("peer_id", "")) for p in peers] + [str(k) for k in history])
    pairwise = run.get("outer") == "noloco"  # replicas are not meant to agree
    odd = set() if pairwise else odd_hashes(peers)
    dead = sum(1 for p in peers if _state(p) == "dead")
    drifted = sum(
        1 for p in peers if _state(p) != "dead" and str(p.get("weights_hash") or "") in odd
    )
    sent = sum(p["bytes_sent"] for p in peers if _real(p.get("bytes_sent")))
    swarm_id, self_id = snapshot.get("swarm_id"), snapshot.get("self_id")
    cards = [
        ("round", _fmt(snapshot.get("round"), ".0f")),
        (
            "peers",
            f"{len(peers) - dead} alive "
            f'<span class="{"bad" if dead else "muted"}">· {dead} dead</span>',
        ),
        (
            "weights",
            weights_spread(peers)
            if pairwise
            else f'<span class="bad">{drifted} differ</span>'
            if drifted
            else "in sync",
        ),
        ("bytes sent (all peers)", human_bytes(sent)),
        ("model", _text(run.get("model"))),
        ("outer optimizer", _text(run.get("outer"))),
        ("codec", _text(run.get("codec"))),
        ("inner steps H", _fmt(run.get("inner_steps"), ".0f")),
    ]
    own_lag_s = snapshot.get("loop_lag_s_max")
    if _real(own_lag_s):
        cards.append(("loop lag (60 s max)", f"{_fmt(1000 * own_lag_s, ',.0f')} ms"))
    extra = [
        f"{_text(k)} {_run_value(v)}"
        for k, v in run.items()
        if k not in ("model", "outer", "codec", "inner_steps", "definition_sha256")
        and not isinstance(v, (dict, list))
    ]
    heads = [
        "peer",
        "address",
        "role",
        "round",
        "step",
        "train loss",
        "eval loss",
        "tokens/s",
        "sent",
        "received",
        "loop lag",
        "last seen",
        "state",
        "weights",
    ] + (["partner · distance"] if pairwise else [])
    left_aligned = ("peer", "address", "role", "state", "partner · distance")
    head = "".join(f"<th{' class=l' if h in left_aligned else ''}>{h}</th>" for h in heads)
    rows = "".join(
        _peer_row(p, snapshot.get("now"), self_id, odd, palette, pairwise) for p in peers
    )
    if not rows:
        rows = f'<tr><td class="l muted" colspan="{len(heads)}">no peers known yet</td></tr>'
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_S}"></noscript>'
        f"<title>shoal · {_text(swarm_id, '?')}</title><style>{CSS}</style>{SCRIPT}</head><body>"
        f"<h1>shoal swarm <code>{_text(swarm_id, '?')}</code></h1>"
        f'<div class="sub">served by peer <code>{_text(self_id, "?")}</code> · '
        f'<span id="live">live, refreshes every {REFRESH_S} s</span> · '
        '<a href="/api/swarm">json</a> · <a href="/metrics">metrics</a></div>'
        f'<div class="cards">{"".join(f"<div class=card>{k}<b>{v}</b></div>" for k, v in cards)}'
        "</div>"
        f'<div class="muted">{" · ".join(extra)}</div>{run_definition(run)}'
        f'<h2>peers</h2><div class="scroll"><table><tr>{head}</tr>{rows}</table></div>'
        f"{task_failures(snapshot)}"
        f"{stage_map(peers, snapshot.get('pipeline'))}"
        f"<h2>loss over rounds</h2>{render_chart(history, palette)}"
        "</body></html>"
    )
