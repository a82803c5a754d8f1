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

import math
import numbers
from collections import Counter
from html import escape
from typing import Any

REFRESH_S = 3
DASH = "–"
PALETTE = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]
STATES = ("alive", "suspect", "dead")
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


def _real(value: Any) -> bool:
    """A finite int/float (numpy included), not a bool, not a string from the wire."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, spec: str = ".3f") -> str:
    """Format a number from the network, or "–" when it is missing or not a finite number."""
    return format(float(value), spec) if _real(value) else DASH


def _text(value: Any, default: str = DASH) -> str:
    """Escape a network string for HTML text or a quoted attribute."""
    return default if value is None or value == "" else escape(str(value))


def human_bytes(n: Any) -> str:
    """Decimal units (1 kB = 1000 B), like most network tools report."""
    if not _real(n) or n < 0:
        return DASH
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return DASH


def _run_value(value: Any) -> str:
    if not _real(value):
        return _text(value)
    return _fmt(value, ",.0f") if float(value).is_integer() else _fmt(value, ".4g")


def _ago(now: Any, then: Any) -> str:
    if not (_real(now) and _real(then)):
        return DASH
    seconds = max(0.0, now - then)  # another clock may be slightly ahead
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds / div:.0f} {unit} ago"
    return f"{seconds / 86400:.0f} d ago"


def _state(peer: dict[str, Any]) -> str:
    """alive/suspect/dead from a known word only: the value also becomes a CSS class."""
    status = peer.get("status")
    if status in STATES:
        return status
    return "alive" if peer.get("alive", True) else "dead"


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


def colours(peer_ids: list[str]) -> dict[str, str]:
    """Stable colour per peer (sorted ids), shared by the table swatch and the chart."""
    out = {}
    for i, pid in enumerate(sorted(set(peer_ids))):
        out[pid] = PALETTE[i] if i < len(PALETTE) else f"hsl({(i * 137.5) % 360:.0f},60%,42%)"
    return out


def _ticks(
    lo: float, hi: float, target: int = 5, integer: bool = False
) -> tuple[float, list[float]]:
    """1-2-2.5-5 x 10^k tick step covering [lo, hi]; returns (step, ticks)."""
    raw = max((hi - lo) / target, 1e-12)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(math.ceil(step)))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return step, [k * step for k in range(first, last + 1)]


def _series(history: Any) -> list[tuple[str, str, list[tuple[float, float]]]]:
    """(peer_id, "eval"/"train", points sorted by round); non-finite values skipped."""
    out = []
    items = sorted(history.items(), key=lambda kv: str(kv[0])) if isinstance(history, dict) else []
    for peer_id, points in items:
        rows = [p for p in points if isinstance(p, dict)] if isinstance(points, list) else []
        for kind in ("eval", "train"):
            xy = sorted(
                (float(p["round"]), float(p[f"{kind}_loss"]))
                for p in rows
                if _real(p.get("round")) and _real(p.get(f"{kind}_loss"))
            )
            if xy:
                out.append((str(peer_id), kind, xy))
    return out


def render_chart(history: Any, palette: dict[str, str] | None = None, width: int = 900) -> str:
    """Eval loss (solid) and train loss (dashed) per peer against outer round, as inline SVG."""
    series = _series(history)
    if not series:
        return (
            f'<svg width="{width}" height="60" role="img"><text x="14" y="36" fill="#888">'
            "no losses reported yet</text></svg>"
        )
    peer_ids = sorted({pid for pid, _, _ in series})
    palette = {**colours(peer_ids), **(palette or {})}
    left, right, top, bottom = 56, 190, 14, 40
    height = max(300, top + bottom + 18 * len(peer_ids) + 40)  # room for the legend
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for *_, xy in series for x, _ in xy]
    ys = [y for *_, xy in series for _, y in xy]
    x_step, x_ticks = _ticks(min(xs), max(max(xs), min(xs) + 1), 8, integer=True)
    lo, hi = min(ys), max(ys)
    pad = max(abs(hi) * 0.05, 0.05) if hi - lo < 1e-9 else 0.0
    y_step, y_ticks = _ticks(lo - pad, hi + pad, 5)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    decimals = len(f"{y_step:.9f}".rstrip("0").split(".")[1])  # as many as the step needs

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * plot_h

    base = top + plot_h
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="loss over rounds" font-size="11">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
        'fill="none" stroke="#ccc"/>',
    ]
    for y in y_ticks:
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
            'stroke="#eee"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">'
            f"{y:.{decimals}f}</text>"
        )
    for x in x_ticks:
        parts.append(
            f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{base}" y2="{base + 4}" stroke="#999"/>'
            f'<text x="{sx(x):.1f}" y="{base + 16}" text-anchor="middle">{x:.0f}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle" '
        'font-size="12">outer round</text>'
        f'<text transform="translate(15 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle" '
        f'font-size="12">loss (nats)</text>'
    )
    for peer_id, kind, xy in series:
        colour, label = palette[peer_id], escape(peer_id)
        style = ' stroke-dasharray="5 4" stroke-opacity="0.65"' if kind == "train" else ""
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in xy)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2"{style} data-peer="{label}" '
            f'points="{points}"><title>{label} {kind} loss</title></polyline>'
        )
        if kind == "eval" and len(xy) <= 40:  # markers make sparse data (1-2 rounds) visible
            parts += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>'
                for x, y in xy
            ]
    lx = left + plot_w + 14
    for i, peer_id in enumerate(peer_ids):
        ly = top + 8 + 18 * i
        shown = escape(peer_id if len(peer_id) <= 20 else peer_id[:19] + "…")
        parts.append(
            f'<line x1="{lx}" x2="{lx + 20}" y1="{ly}" y2="{ly}" stroke="{palette[peer_id]}" '
            'stroke-width="2"/>'
            f'<text x="{lx + 26}" y="{ly + 4}">{shown}<title>{escape(peer_id)}</title></text>'
        )
    ly = top + 8 + 18 * len(peer_ids) + 6
    parts.append(
        f'<line x1="{lx}" x2="{lx + 20}" y1="{ly}" y2="{ly}" stroke="#555" stroke-width="2"/>'
        f'<text x="{lx + 26}" y="{ly + 4}" fill="#666">eval</text>'
        f'<line x1="{lx + 60}" x2="{lx + 80}" y1="{ly}" y2="{ly}" stroke="#555" stroke-width="2" '
        f'stroke-dasharray="5 4"/><text x="{lx + 86}" y="{ly + 4}" fill="#666">train</text></svg>'
    )
    return "".join(parts)


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
    cells = [
        f'<td class="l">{swatch}<code>{_text(pid)}</code>{" (this peer)" if me else ""}</td>',
        f'<td class="l">{_text(p.get("address"))}</td>',
        f'<td class="l">{_text(p.get("role"))}{role_detail}</td>',
        f"<td>{_fmt(p.get('round'), '.0f')}</td><td>{_fmt(p.get('step'), '.0f')}</td>",
        f"<td>{_fmt(p.get('train_loss'))}</td><td>{_fmt(p.get('eval_loss'))}</td>",
        f"<td>{_fmt(p.get('tokens_per_s'), ',.0f')}</td>",
        f"<td>{human_bytes(p.get('bytes_sent'))}</td><td>{human_bytes(p.get('bytes_received'))}</td>",
        _loop_lag_cell(p.get("loop_lag_ms_max")),
        f'<td>{_ago(now, p.get("last_seen"))}</td><td class="st l">{state}</td>',
        f"<td{drift}><code>{_text(weights_hash[:8])}</code></td>",
    ]
    if pairwise:
        cells.append(
            f'<td class="l"><code>{_text(p.get("partner"))}</code> '
            f"{_fmt(p.get('partner_distance'), '.2e')}</td>"
        )
    return f'<tr class="{state}{" me" if me else ""}">{"".join(cells)}</tr>'


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
        if k not in ("model", "outer", "codec", "inner_steps") and not isinstance(v, (dict, list))
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
        f'<div class="muted">{" · ".join(extra)}</div>'
        f'<h2>peers</h2><div class="scroll"><table><tr>{head}</tr>{rows}</table></div>'
        f"{task_failures(snapshot)}"
        f"{stage_map(peers, snapshot.get('pipeline'))}"
        f"<h2>loss over rounds</h2>{render_chart(history, palette)}"
        "</body></html>"
    )


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
