"""Retry timing: exponential backoff with full jitter, and the provider's Retry-After."""

from __future__ import annotations

import random
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from time import time


def backoff_s(attempt: int, base: float = 0.5, cap: float = 30.0, rand: float | None = None) -> float:
    """Delay before retry number `attempt` (1-based): uniform in [0, min(cap, base*2^(n-1))]."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return ceiling * (random.random() if rand is None else rand)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the provider asked us to wait: `retry-after-ms`, then `retry-after`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if ms := lowered.get("retry-after-ms"):
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time() if now is None else now), 0.0)
