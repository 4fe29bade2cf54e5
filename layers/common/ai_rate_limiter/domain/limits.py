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


def request_limit(provider: Provider, margin: float, prefix: str = "airl:lim") -> Limit:
    """Strict pacing (burst 1): one request every window/limit, so no window holds more."""
    interval_us = provider.time_window * 1_000_000 * (1.0 + margin) / provider.limit
    return Limit(f"{prefix}:{provider.limiter_key}:req", round(interval_us))


def provider_limits(provider: Provider, margin: float) -> list[Limit]:
    return [request_limit(provider, margin)]
