"""Every outbound HTTP request leaves through a client made here.

Our own requests (webhooks) use `httpx`; the provider SDKs require their `httpx2` fork, which has
the same API. Both get the same timeouts, pool limits and redirect policy from one function.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import httpx
import httpx2

USER_AGENT = "ai-rate-limiter/0.1"


def _client(lib: ModuleType, timeout_s: float, max_connections: int) -> Any:
    return lib.Client(
        timeout=lib.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
        limits=lib.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,
    )


def http_client(timeout_s: float, max_connections: int = 100) -> httpx.Client:
    client: httpx.Client = _client(httpx, timeout_s, max_connections)
    return client


def sdk_http_client(timeout_s: float, max_connections: int = 100) -> httpx2.Client:
    client: httpx2.Client = _client(httpx2, timeout_s, max_connections)
    return client
