"""The worker's ports: what processing a message needs of the world, as small Protocols.

`bootstrap.Container` satisfies `WorkerPorts` with the real adapters (Postgres, Redis,
RabbitMQ, the provider SDKs, the system clock); `tests/fakes.py` satisfies it in memory.
Each Protocol holds only the methods the worker calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from .adapters.egress import Departure
from .config import Settings
from .domain.limits import Limit, Reservation
from .domain.models import ChatRequest, ClaimedMessage, Provider, ProviderResult
from .domain.names import BrokerNames

Row = dict[str, Any]


class MessageStore(Protocol):
    """Message rows: every write is fenced by the claim's `attempt`, and fails (False, None)
    once another worker holds the message."""

    def claim(self, ids: Sequence[str], lease_s: float, token: str | None = None) -> list[ClaimedMessage]: ...

    def held_elsewhere(self, ids: Sequence[str]) -> list[Row]: ...

    def queue_providers(self, tenant: str, queue_id: str) -> list[tuple[Row, float]]: ...

    def renew(
        self, msg: ClaimedMessage, lease_s: float, counted: bool, error: str
    ) -> ClaimedMessage | None: ...

    def complete(self, msg: ClaimedMessage, provider: Provider, result: ProviderResult) -> bool: ...

    def fail(
        self,
        msg: ClaimedMessage,
        error: str,
        provider: Provider | None,
        counted: bool = True,
        dead_letter: bool = False,
    ) -> bool: ...

    def release(self, msg: ClaimedMessage, note: str | None = None) -> bool: ...

    def published(self, ids: Sequence[str]) -> None: ...

    def set_provider_status(
        self, provider_id: str, status: str, detail: str | None, version: str | None = None
    ) -> bool: ...


class Limiter(Protocol):
    """The shared limiter: GCRA slots over several limits at once, and places in flight."""

    def reserve(
        self, candidates: Sequence[Sequence[Limit]], max_wait_s: float, weights: Sequence[float] = ()
    ) -> Reservation: ...

    def settle(self, adjustments: dict[str, int]) -> None: ...

    def push(self, limits: Sequence[Limit], not_before_s: float) -> int: ...

    def refund(self, limits: Sequence[Limit], slot_us: int) -> int: ...

    def acquire(self, key: str, max_in_flight: int, lease_s: float) -> str | None: ...

    def release(self, key: str, lease: str) -> None: ...

    def wait_for_release(self, keys: Sequence[str], timeout_s: float) -> None: ...


class ProviderCalls(Protocol):
    def call(self, p: Provider, req: ChatRequest, departure: Departure | None = None) -> ProviderResult: ...


class DelayedPublisher(Protocol):
    def publish_delayed(self, names: BrokerNames, body: bytes, delay_s: float) -> None: ...

    def publish_dead(self, names: BrokerNames, copies: Sequence[tuple[bytes, str]]) -> None: ...


class Clock(Protocol):
    """The worker's clock: a monotonic time in seconds, and sleeping on it."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


# Set when the execution environment is being shut down (locally, on SIGTERM): sleeps end at
# once, work that has not been sent is handed back, and calls already out are waited for.
SHUTTING_DOWN = threading.Event()


class SystemClock:
    """The process's monotonic clock; its sleeps end early when the environment shuts down."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        SHUTTING_DOWN.wait(max(seconds, 0.0))


SYSTEM_CLOCK = SystemClock()


class WorkerPorts(Protocol):
    """Everything processing a message uses (read-only, so the container's adapters fit)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> MessageStore: ...

    @property
    def limiter(self) -> Limiter: ...

    @property
    def providers(self) -> ProviderCalls: ...

    @property
    def broker(self) -> DelayedPublisher: ...

    @property
    def clock(self) -> Clock: ...

    def names(self, tenant_id: str, queue_id: str) -> BrokerNames: ...
