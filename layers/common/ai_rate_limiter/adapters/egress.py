"""Every outbound HTTP request leaves through a client made here.

Our own requests (webhooks) use `httpx`; the provider SDKs require their `httpx2` fork, which has
the same API. Both get the same timeouts, pool limits and redirect policy from one function.
"""

from __future__ import annotations

import functools
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import certifi
import httpx
import httpx2

USER_AGENT = "ai-rate-limiter/0.1"


@dataclass
class Departure:
    """When a request may leave: not after `leave_by` (this process's monotonic clock), or it
    is not sent and `on_late` raises. `sent_at` is when it left."""

    leave_by: float
    on_late: Callable[[float], Exception]
    sent_at: float | None = None


_departures = threading.local()


def departing(departure: Departure | None) -> None:
    """The departure the calling thread's next request keeps to (None: any time)."""
    _departures.current = departure


def _check_departure(request: Any) -> None:
    """The last step before a request goes to the transport: on its time, or not at all."""
    departure: Departure | None = getattr(_departures, "current", None)
    if departure is None:
        return
    now = time.monotonic()
    if now > departure.leave_by:
        raise departure.on_late(now - departure.leave_by)
    departure.sent_at = now


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client: loading the CA bundle takes about 50 ms, which each
    new client would otherwise spend again."""
    return ssl.create_default_context(cafile=certifi.where())


def _client(lib: ModuleType, timeout_s: float, max_connections: int, hooks: bool = False) -> Any:
    return lib.Client(
        verify=tls_context(),
        timeout=lib.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
        limits=lib.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,
        event_hooks={"request": [_check_departure]} if hooks else None,
    )


def http_client(timeout_s: float, max_connections: int = 100) -> httpx.Client:
    client: httpx.Client = _client(httpx, timeout_s, max_connections)
    return client


def sdk_http_client(timeout_s: float, max_connections: int = 100) -> httpx2.Client:
    client: httpx2.Client = _client(httpx2, timeout_s, max_connections, hooks=True)
    return client
