"""Reading a shape's settings from the environment, within hard bounds: a shape never
runs longer than MAX_SECONDS nor with more than MAX_USERS users, whatever it is given."""

from __future__ import annotations

import os

MAX_SECONDS = 4 * 3600
MAX_USERS = 2_000


def setting(name: str, default: float, low: float, high: float) -> float:
    """The number in ``name`` (or ``default``); a SystemExit naming it when out of range."""
    raw = os.environ.get(name)
    value = float(raw) if raw else default
    if not low <= value <= high:
        raise SystemExit(f"loadtests: {name}={raw} is outside {low:g}..{high:g}")
    return value
