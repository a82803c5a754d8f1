"""The dashboard's loss chart: one inline SVG of every peer's held-out loss by round.

Pure functions over the snapshot's `history` (numbers only reach the SVG through `_fmt`,
peer ids through `escape`), so the chart cannot carry anything from the network but text.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from shoal.peer.dashboard_format import _real

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
