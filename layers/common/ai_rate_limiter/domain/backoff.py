"""Retry timing: exponential backoff with full jitter, and the provider's Retry-After."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from time import time


def backoff_s(
    attempt: int, base: float = 0.5, cap: float = 30.0, rand: float | None = None, floor: float = 0.0
) -> float:
    """Delay before retry number `attempt` (1-based): uniform in [floor * c, c], where c is
    min(cap, base*2^(n-1)). `floor` 0 is full jitter; 0.5 ("equal jitter") still spreads the
    retries, and gives their sum a minimum: how long an outage the tries are sure to outlast."""
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return ceiling * (floor + (1.0 - floor) * (random.random() if rand is None else rand))


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the provider asked us to wait: `retry-after-ms`, then `retry-after`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if ms := lowered.get("retry-after-ms"):
        try:
            return sane_wait(float(ms) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        return sane_wait(float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return sane_wait(when - (time() if now is None else now))


MAX_WAIT_S = 86_400.0  # the longest wait a provider's answer is taken at its word for


def sane_wait(seconds: float) -> float:
    """A wait a provider asked for, within [0, MAX_WAIT_S]; `nan` raises ValueError."""
    if math.isnan(seconds):
        raise ValueError("not a number")
    return min(max(seconds, 0.0), MAX_WAIT_S)
