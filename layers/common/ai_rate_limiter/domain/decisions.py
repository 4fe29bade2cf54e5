"""What to do when a provider call fails: a pure decision, apart from the work of doing it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ProviderError, ProviderRejected, QuotaExhausted, RateLimited
from .backoff import backoff_s


@dataclass(frozen=True)
class OnError:
    """`retry` False: the message fails with `error`. Otherwise it is tried again after
    `pause_s`, on another provider first if `avoid_provider`."""

    retry: bool
    error: str
    pause_s: float = 0.0
    counted: bool = True  # the try is spent from the message's budget
    avoid_provider: bool = False
    hold_provider_s: float | None = None  # every worker waits this long for this provider (429)
    quota_exhausted: bool = False  # the provider is stopped until it gets a new key
    dead_letter: bool = False  # failed because the message used up its tries


NO_OUTCOME = "no attempt ended with an outcome"  # a message whose every lease ran out


def gave_up(tries: int, detail: str | None) -> str:
    """Why a message that used up its `tries` failed: what its last try ended with."""
    return f"gave up after {tries} attempts: {detail or NO_OUTCOME}"


def out_of_tries(tries: int, max_attempts: int, detail: str) -> OnError | None:
    """The message fails, dead-lettered, if this try (`tries` before it) was its last."""
    if tries + 1 >= max_attempts:
        return OnError(False, gave_up(tries + 1, detail), dead_letter=True)
    return None


def on_error(exc: ProviderError, tries: int, max_attempts: int) -> OnError:
    """`tries`: the calls already counted against the message before this one."""
    if isinstance(exc, QuotaExhausted):
        return OnError(False, exc.detail, quota_exhausted=True)
    if isinstance(exc, ProviderRejected):
        return OnError(False, exc.detail)
    if isinstance(exc, RateLimited):
        # The provider's reset holds every worker; the try is not the message's fault.
        hold = exc.retry_after_s or backoff_s(1, base=1.0)
        return OnError(True, exc.detail, counted=False, hold_provider_s=hold)
    if spent := out_of_tries(tries, max_attempts, exc.detail):
        return spent
    # Equal jitter: with the defaults (5 tries, 0.5 s doubling) a message outlasts any outage
    # of the provider shorter than 0.25 + 0.5 + 1 + 2 = 3.75 s.
    pause = getattr(exc, "retry_after_s", None) or backoff_s(tries + 1, floor=0.5)
    return OnError(True, exc.detail, pause_s=pause, avoid_provider=True)
