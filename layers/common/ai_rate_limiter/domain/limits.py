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
