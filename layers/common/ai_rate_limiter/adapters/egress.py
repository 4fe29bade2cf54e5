"""Every outbound HTTP request leaves through a client made here."""

from __future__ import annotations

import httpx

USER_AGENT = "ai-rate-limiter/0.1"


def http_client(timeout_s: float, max_connections: int = 100) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,
    )
