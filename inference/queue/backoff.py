"""Retry backoff: exponential with full jitter (AWS Architecture Blog, "Exponential Backoff And
Jitter"): the delay of attempt ``k`` is uniform in ``[0, min(max_s, base_s * 2**(k-1))]``."""

from __future__ import annotations

import random


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retrying after failed attempt number ``attempt`` (1-based)."""
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    ceiling = min(max_s, base_s * (2 ** min(attempt - 1, 62)))
    return (rng or random).uniform(0.0, ceiling)
