"""Each tenant's limits on the API itself, through the project's own limiter: one Redis call a
request, both limits at once. Over either: 429 with Retry-After, and nothing is done."""

from __future__ import annotations

import logging

from ..bootstrap import Container
from ..domain.limits import inbound_limits
from ..errors import LimiterUnavailable, TooManyRequests

log = logging.getLogger(__name__)


def admit(c: Container, tenant: str, method: str) -> None:
    s = c.settings
    limits = inbound_limits(
        tenant, method, s.inbound_per_s, s.inbound_burst, s.inbound_writes, s.inbound_writes_window_s
    )
    if not limits:
        return
    try:
        reservation = c.limiter.reserve([limits], 0.0)
    except LimiterUnavailable as exc:
        # Redis down: requests go on (API Gateway's throttling still holds), and /health says so.
        log.warning("inbound limits not applied: %s", exc.detail)
        return
    if not reservation.reserved:
        raise TooManyRequests(
            f"Too many requests for this tenant: try again in {reservation.wait_s:.1f} s.",
            retry_after_s=reservation.wait_s,
        )
