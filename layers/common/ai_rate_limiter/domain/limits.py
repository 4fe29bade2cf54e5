"""What a provider's limits mean to the limiter: GCRA increments and tolerances."""

from __future__ import annotations

from dataclasses import dataclass

from .models import Provider


@dataclass(frozen=True)
class Limit:
    key: str
    increment_us: int
    tolerance_us: int = 0


@dataclass(slots=True)
class Reservation:
    index: int
    wait_s: float
    reserved: bool
    slot_us: int = 0  # the slot's start on the limiter's (Redis) clock
    # The slot's start on this process's monotonic clock lies in [earliest, latest].
    earliest: float = 0.0
    latest: float = 0.0


class ClockOffset:
    """The limiter's clock minus this process's, learnt from reservation round trips the way
    NTP does: each answer bounds the offset by when the call was sent and answered, and the
    tightest recent bound wins (a slow, queued call cannot spoil it)."""

    def __init__(self, keep_s: float = 30.0) -> None:
        self.keep_s = keep_s
        self.low = self.high = 0.0
        self.taken_at = -1e18

    def observe(self, remote_now: float, sent: float, answered: float) -> None:
        width, taken = answered - sent, answered
        if width <= self.high - self.low or taken - self.taken_at > self.keep_s:
            self.low, self.high, self.taken_at = remote_now - answered, remote_now - sent, taken

    def local_bounds(self, remote_time: float) -> tuple[float, float]:
        """When `remote_time` happens on this clock: (earliest, latest)."""
        return remote_time - self.high, remote_time - self.low


GUARD_SPREAD = 1.5  # the guard covers this many times the p99 of the measured write times


def guard_s(floor_s: float, late_s: float, write_p99_s: float | None) -> float:
    """How much longer than its window to pace a provider: as long as requests may arrive
    after their slots. The check just before a request's write lets it start at most `late_s`
    after its slot; its bytes are on their way somewhere between that check and the moment the
    write has returned, a span that grows with the load on the worker's machine (a thread can
    wait for the interpreter on either side of the system call). So the guard is `floor_s` or,
    when more, `late_s` plus GUARD_SPREAD times the p99 of recent write times."""
    if write_p99_s is None:
        return floor_s
    return max(floor_s, late_s + GUARD_SPREAD * write_p99_s)


@dataclass(frozen=True)
class Headroom:
    """How much longer than the provider's window the limiter paces for: guard + margin·window."""

    guard_s: float = 0.25
    margin: float = 0.0

    def window(self, window_s: float) -> float:
        return window_s * (1.0 + self.margin) + self.guard_s


def request_limit(provider: Provider, headroom: Headroom, prefix: str = "airl:lim") -> Limit:
    """Strict pacing (burst 1): one request every window/limit, so no window holds more."""
    interval_us = headroom.window(provider.time_window) * 1_000_000 / provider.limit
    return Limit(f"{prefix}:{provider.limiter_key}:req", round(interval_us))


def per_token_us(provider: Provider, headroom: Headroom) -> float:
    assert provider.token_limit, "only providers with a token limit"
    return headroom.window(provider.time_window) * 1_000_000 / provider.token_limit


def token_key(provider: Provider, prefix: str = "airl:lim") -> str:
    return f"{prefix}:{provider.limiter_key}:tok"


def provider_limits(provider: Provider, headroom: Headroom, tokens: int = 0) -> list[Limit]:
    """The request limit and, if the provider has one, the token limit charged `tokens`."""
    limits = [request_limit(provider, headroom)]
    if provider.token_limit:
        limits.append(Limit(token_key(provider), round(tokens * per_token_us(provider, headroom))))
    return limits


def settlement(provider: Provider, headroom: Headroom, reserved: int, used: int) -> dict[str, int]:
    """What to move the token schedule by once the provider has said how many were used."""
    if not provider.token_limit or used == reserved:
        return {}
    return {token_key(provider): round((used - reserved) * per_token_us(provider, headroom))}


def concurrency_key(provider: Provider, prefix: str = "airl:lim") -> str:
    return f"{prefix}:{provider.limiter_key}:conc"


WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def inbound_limits(
    tenant: str, method: str, per_s: float, burst: int, writes: int, writes_window_s: float
) -> list[Limit]:
    """A tenant's limits on the API for one request: every request `per_s` a second with a
    burst of `burst`, and those that create or change something `writes` per
    `writes_window_s` (all at once at most); 0 turns one off. GCRA: the tolerance is the
    burst less one increment."""
    limits = []
    if per_s > 0:
        every_us = 1_000_000 / per_s
        limits.append(Limit(f"airl:in:{tenant}:all", round(every_us), round((max(burst, 1) - 1) * every_us)))
    if writes > 0 and method.upper() in WRITES:
        every_us = writes_window_s * 1_000_000 / writes
        limits.append(Limit(f"airl:in:{tenant}:write", round(every_us), round((writes - 1) * every_us)))
    return limits
