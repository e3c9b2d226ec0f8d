"""Human-readable numbers and durations for tables and messages."""

from __future__ import annotations

import math

_UNITS = (
    ("years", 365.25 * 86400.0),
    ("days", 86400.0),
    ("hours", 3600.0),
    ("minutes", 60.0),
    ("s", 1.0),
)


def format_duration(seconds: float) -> str:
    """``3.2 s``, ``4.1 hours``, ``2.00e+12 years``."""
    if not math.isfinite(seconds):
        return "forever"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    for name, size in _UNITS:
        if seconds >= size:
            value = seconds / size
            return f"{value:.3g} {name}" if value < 1e5 else f"{value:.2e} {name}"
    raise AssertionError("unreachable")


def format_count(n: int | float) -> str:
    """Integers below a million in full, larger ones in scientific notation."""
    return f"{int(n):,}" if n < 1e6 else f"{float(n):.3e}"
