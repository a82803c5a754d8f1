"""Formatting shared by the dashboard's page, chart and metrics: numbers only when they are
finite reals, text escaped by the caller, a peer's state from its table entry."""

from __future__ import annotations

import math
import numbers
from html import escape
from typing import Any

DASH = "–"
STATES = ("alive", "suspect", "dead")


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
