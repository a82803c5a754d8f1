"""The swarm dashboard, rendered from one snapshot dict (what `/api/swarm` returns).

Pure functions, no I/O: `render_html` gives a self-contained page (inline CSS and SVG,
no scripts or resources from elsewhere, so it works offline) that reloads itself;
`render_metrics` gives Prometheus text format 0.0.4. Every string in a snapshot came
from the network (peer ids, addresses, roles), so all of it is escaped.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from html import escape
from typing import Any

REFRESH_S = 3
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}.sub{color:#666;margin-bottom:16px}
table{border-collapse:collapse;background:#fff;margin:12px 0}
th,td{padding:4px 10px;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td.l,th.l{text-align:left}
.dead{color:#aaa}.dead td.state{color:#c62828;font-weight:600}td.state{color:#2e7d32}
.suspect td.state{color:#ef6c00}.drift{background:#ffe0e0;color:#b71c1c;font-weight:600}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{background:#fff;border:1px solid #e4e4e4;padding:8px 14px}
.card b{display:block;font-size:18px}svg{background:#fff;border:1px solid #e4e4e4}
code{font-size:12px}
"""


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return "–"


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or n < 0:
        return "–"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "–"


def _ago(now: float, then: Any) -> str:
    if not isinstance(then, (int, float)):
        return "–"
    seconds = max(0.0, now - then)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _majority_hash(peers: list[dict]) -> str | None:
    hashes = Counter(p.get("weights_hash") for p in peers if p.get("alive", True) and p.get("weights_hash"))
    return hashes.most_common(1)[0][0] if hashes else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def render_chart(history: dict[str, list[dict]], width: int = 760, height: int = 280) -> str:
    """Eval loss (solid) and train loss (dashed) per peer against outer round, as SVG."""
    left, right, top, bottom = 52, 150, 14, 34
    series = []
    for i, (peer_id, points) in enumerate(sorted(history.items())):
        for key, dash in (("eval_loss", ""), ("train_loss", "4 3")):
            xy = [(p.get("round"), p.get(key)) for p in points if isinstance(p, dict)]
            xy = [(float(x), float(y)) for x, y in xy if _finite(x) and _finite(y)]
            if xy:
                series.append((peer_id, COLOURS[i % len(COLOURS)], dash, xy))
    if not series:
        return f'<svg width="{width}" height="60" role="img"><text x="12" y="35" fill="#888">no losses reported yet</text></svg>'
    xs = [x for *_, xy in series for x, _ in xy]
    ys = [y for *_, xy in series for _, y in xy]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-6:
        y0, y1 = y0 - 0.5, y1 + 0.5
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * plot_h

    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="loss over rounds">']
    for k in range(5):  # y ticks
        y = y0 + (y1 - y0) * k / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.2f}</text>')
    step = max(1, math.ceil((x1 - x0) / 10))
    for x in range(int(x0), int(x1) + 1, step):  # x ticks
        parts.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11">{x}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle" font-size="12">outer round</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2:.0f}" transform="rotate(-90 14 {top + plot_h / 2:.0f})" text-anchor="middle" font-size="12">loss (nats)</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>')
    legend_y = top + 10
    for peer_id, colour, dash, xy in series:
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in xy)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash_attr} points="{points}"><title>{escape(peer_id)}</title></polyline>')
        if len(xy) == 1:
            parts.append(f'<circle cx="{sx(xy[0][0]):.1f}" cy="{sy(xy[0][1]):.1f}" r="3" fill="{colour}"/>')
        if not dash:
            parts.append(f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 28}" y1="{legend_y}" y2="{legend_y}" stroke="{colour}" stroke-width="2"/>')
            parts.append(f'<text x="{left + plot_w + 32}" y="{legend_y + 4}" font-size="11">{escape(peer_id[:16])}</text>')
            legend_y += 16
    parts.append(f'<text x="{left + plot_w + 10}" y="{legend_y + 10}" font-size="10" fill="#777">solid: eval, dashed: train</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(snapshot: dict[str, Any]) -> str:
    now = snapshot.get("now") or time.time()
    peers = [p for p in snapshot.get("peers", []) if isinstance(p, dict)]
    run = snapshot.get("run", {}) or {}
    majority = _majority_hash(peers)
    alive = sum(1 for p in peers if p.get("alive", True))
    rows = []
    for p in peers:
        state = p.get("status") or ("alive" if p.get("alive", True) else "dead")
        weights_hash = p.get("weights_hash") or ""
        drift = ' class="drift"' if weights_hash and majority and weights_hash != majority and p.get("alive", True) else ""
        me = " (this peer)" if p.get("peer_id") == snapshot.get("self_id") else ""
        rows.append(
            f'<tr class="{escape(str(state))}"><td class="l"><code>{escape(str(p.get("peer_id", "?")))}</code>{me}</td>'
            f'<td class="l">{escape(str(p.get("address", "")))}</td><td class="l">{escape(str(p.get("role", "")))}</td>'
            f'<td>{_num(p.get("round"), "{}")}</td><td>{_num(p.get("step"), "{}")}</td>'
            f'<td>{_num(p.get("train_loss"))}</td><td>{_num(p.get("eval_loss"))}</td><td>{_num(p.get("tokens_per_s"), "{:,.0f}")}</td>'
            f'<td>{human_bytes(p.get("bytes_sent"))}</td><td>{human_bytes(p.get("bytes_received"))}</td>'
            f'<td>{_ago(now, p.get("last_seen"))}</td><td class="state">{escape(str(state))}</td>'
            f'<td{drift}><code>{escape(weights_hash[:8]) or "–"}</code></td></tr>'
        )
    sent = sum(p.get("bytes_sent", 0) for p in peers if isinstance(p.get("bytes_sent"), int))
    cards = [("round", _num(snapshot.get("round"), "{}")), ("peers alive", f"{alive} / {len(peers)}"), ("bytes sent (swarm)", human_bytes(sent)),
             ("model", escape(str(run.get("model", "–")))), ("outer / codec", f'{escape(str(run.get("outer", "–")))} / {escape(str(run.get("codec", "–")))}'),
             ("inner steps H", _num(run.get("inner_steps"), "{}"))]
    card_html = "".join(f'<div class="card">{label}<b>{value}</b></div>' for label, value in cards)
    header = "".join(f"<th{' class=l' if h in ('peer', 'address', 'role') else ''}>{h}</th>" for h in
                     ("peer", "address", "role", "round", "step", "train loss", "eval loss", "tokens/s", "sent", "received", "last seen", "state", "weights"))
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">'
        f"<title>shoal · {escape(str(snapshot.get('swarm_id', '')))}</title><style>{CSS}</style></head><body>"
        f"<h1>shoal swarm <code>{escape(str(snapshot.get('swarm_id', '?')))}</code></h1>"
        f'<div class="sub">served by <code>{escape(str(snapshot.get("self_id", "?")))}</code> · '
        f"refreshes every {REFRESH_S} s · <a href=\"/api/swarm\">json</a> · <a href=\"/metrics\">metrics</a></div>"
        f'<div class="cards">{card_html}</div>'
        f"<table><tr>{header}</tr>{''.join(rows)}</table>"
        f"<h2 style=\"font-size:16px\">loss over rounds</h2>{render_chart(snapshot.get('history', {}) or {})}"
        "</body></html>"
    )


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


PEER_GAUGES = [
    ("shoal_peer_round", "round", "gauge", "Outer rounds applied by the peer."),
    ("shoal_peer_step", "step", "gauge", "Inner steps taken by the peer."),
    ("shoal_peer_train_loss", "train_loss", "gauge", "Mean training loss of the peer's last inner phase (nats)."),
    ("shoal_peer_eval_loss", "eval_loss", "gauge", "Held-out loss after the peer's last outer step (nats)."),
    ("shoal_peer_tokens_per_second", "tokens_per_s", "gauge", "Training throughput of the peer."),
    ("shoal_peer_bytes_sent_total", "bytes_sent", "counter", "Body bytes the peer sent."),
    ("shoal_peer_bytes_received_total", "bytes_received", "counter", "Body bytes the peer received."),
]


def render_metrics(snapshot: dict[str, Any]) -> str:
    peers = [p for p in snapshot.get("peers", []) if isinstance(p, dict)]
    alive = sum(1 for p in peers if p.get("alive", True))
    lines = [
        "# HELP shoal_peers Peers in this peer's table, by state.", "# TYPE shoal_peers gauge",
        f'shoal_peers{{state="alive"}} {alive}', f'shoal_peers{{state="dead"}} {len(peers) - alive}',
    ]
    if _finite(snapshot.get("round")):
        lines += ["# HELP shoal_round Outer rounds applied by this peer.", "# TYPE shoal_round gauge", f"shoal_round {snapshot['round']}"]
    lines += ["# HELP shoal_peer_alive 1 if the peer is alive in this peer's view.", "# TYPE shoal_peer_alive gauge"]
    lines += [f'shoal_peer_alive{{peer="{_label(p.get("peer_id"))}"}} {int(bool(p.get("alive", True)))}' for p in peers]
    for metric, key, kind, help_text in PEER_GAUGES:
        samples = [f'{metric}{{peer="{_label(p.get("peer_id"))}"}} {p[key]}' for p in peers if _finite(p.get(key))]
        if samples:
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", *samples]
    return "\n".join(lines) + "\n"
