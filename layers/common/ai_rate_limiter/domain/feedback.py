"""What a provider's rate-limit headers say about the limits it enforces.

OpenAI, Azure and DeepSeek: `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests`
(durations such as `1s`, `6m0s`, `20ms`) and the `-tokens` pair. Anthropic:
`anthropic-ratelimit-requests-remaining`, `anthropic-ratelimit-requests-reset` (RFC 3339) and
the `-tokens` pair.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from time import time

DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class Exhausted:
    """A limit the provider says has nothing left, and the seconds until it resets."""

    kind: str  # "requests" or "tokens"
    reset_s: float


def duration_s(value: str) -> float | None:
    parts = DURATION.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(n) * UNIT_S[u] for n, u in parts)


def reset_s(value: str, now: float | None = None) -> float | None:
    """A reset given as a duration (`6m0s`), seconds (`12`), or an RFC 3339 time."""
    value = value.strip()
    if (seconds := duration_s(value)) is not None:
        return seconds
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return max(when - (time() if now is None else now), 0.0)


def exhausted(headers: Mapping[str, str], now: float | None = None) -> list[Exhausted]:
    """The limits with `remaining` at 0, each with its reset."""
    h = {k.lower(): v for k, v in headers.items()}
    out = []
    for kind in ("requests", "tokens"):
        for remaining, reset in (
            (f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}"),
            (f"anthropic-ratelimit-{kind}-remaining", f"anthropic-ratelimit-{kind}-reset"),
        ):
            if h.get(remaining, "").strip() == "0" and (s := reset_s(h.get(reset, ""), now)):
                out.append(Exhausted(kind, s))
    return out
