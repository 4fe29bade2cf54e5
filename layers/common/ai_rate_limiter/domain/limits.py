"""What a provider's limits mean to the limiter: GCRA increments and tolerances."""

from __future__ import annotations

from dataclasses import dataclass

from .models import Provider


@dataclass(frozen=True)
class Limit:
    key: str
    increment_us: int
    tolerance_us: int = 0


@dataclass(frozen=True)
class Reservation:
    index: int
    wait_s: float
    reserved: bool
    slot_us: int = 0  # the slot's start on the limiter's (Redis) clock


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


def provider_limits(provider: Provider, headroom: Headroom) -> list[Limit]:
    return [request_limit(provider, headroom)]
