"""The worker's use case: claim each delivered message, wait for the limiter, call, store.

Whole-batch retry is the cloud's rule, so one bad message never raises: its failure is
recorded in Postgres. Only an unreachable dependency raises, so the batch is delivered again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from typing import Any

from ..adapters.postgres import provider_from_row
from ..bootstrap import Container
from ..domain import tokens
from ..domain.backoff import backoff_s
from ..domain.feedback import exhausted
from ..domain.limits import Headroom, Limit, concurrency_key, provider_limits, settlement, token_key
from ..domain.models import ClaimedMessage, Provider
from ..domain.rmq_event import parse_event
from ..errors import (
    DependencyUnavailable,
    LimiterUnavailable,
    ProviderError,
    ProviderRejected,
    QuotaExhausted,
    RateLimited,
)
from . import dispatch

log = logging.getLogger(__name__)
SAFETY_S = 1.0  # never plan work into the last second of an invocation
MAX_LATE_WAKEUPS = 5
LIMITER_RETRY_S = 5.0  # how long a message waits when Redis is unreachable


@dataclass(frozen=True)
class Deadline:
    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()


def message_ids(event: Mapping[str, Any]) -> tuple[list[str], int]:
    """Message ids in delivery order, and how many bodies were malformed (logged and acked)."""
    ids, malformed = [], 0
    for d in parse_event(event):
        try:
            ids.append(str(uuid.UUID(json.loads(d.data)["message_id"])))
        except (ValueError, KeyError, TypeError):
            log.warning("skipping a malformed message on %s (%d bytes)", d.queue, len(d.data))
            malformed += 1
    return list(dict.fromkeys(ids)), malformed


def handle_event(c: Container, event: Mapping[str, Any], remaining_s: float) -> dict[str, int]:
    deadline = Deadline.after(remaining_s)
    ids, malformed = message_ids(event)
    claimed = c.store.claim(ids, lease_s=remaining_s + 30)
    outcomes: Counter[str] = Counter(malformed=malformed, skipped=len(ids) - len(claimed))
    if len(claimed) < len(ids):
        outcomes["parked"] = park_held(c, set(ids) - {m.id for m in claimed})
    if not claimed:
        return dict(+outcomes)
    providers: dict[tuple[str, str], list[Provider]] = {}
    threads: dict[tuple[str, str], Executor] = {}
    for m in claimed:
        key = (m.tenant_id, m.queue_id)
        if key not in providers:
            providers[key] = [provider_from_row(r, w) for r, w in c.store.queue_providers(*key)]
            threads[key] = c.threads(*key)
    call_budget = min(c.settings.provider_timeout_s, remaining_s / 3)

    def run(m: ClaimedMessage) -> str:
        return process(c, m, providers[(m.tenant_id, m.queue_id)], deadline, call_budget)

    futures = [threads[(m.tenant_id, m.queue_id)].submit(run, m) for m in claimed]
    wait(futures)
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    outcomes.update(f.result() for f in futures if f.exception() is None)
    for batch_id in {m.batch_id for m in claimed if m.batch_id}:
        c.store.finish_batch_if_done(batch_id)
    if errors:
        raise errors[0]  # only DependencyUnavailable gets here: redeliver the whole batch
    return dict(+outcomes)


def park_held(c: Container, ids: set[str]) -> int:
    """A redelivered message another worker still leases comes back once that lease ends,
    so it is not lost if that worker died."""
    held = c.store.held_elsewhere(sorted(ids))
    for row in held:
        dispatch.publish_later(c, row["tenant_id"], row["queue_id"], row["id"], row["lease_left_s"] + 1.0)
    return len(held)


def process(
    c: Container, m: ClaimedMessage, providers: list[Provider], deadline: Deadline, call_budget: float
) -> str:
    try:
        return _attempt_until_done(c, m, providers, deadline, call_budget)
    except LimiterUnavailable as exc:
        # Without the shared limiter nothing may be sent: the message waits, nothing fails.
        log.warning("limiter unreachable; message %s waits %.0fs: %s", m.id, LIMITER_RETRY_S, exc.detail)
        try:
            dispatch.defer(c, m, LIMITER_RETRY_S, "waiting for the rate limiter (redis unreachable)")
        except DependencyUnavailable:
            _quietly(lambda: c.store.release(m, None))
            raise
        return "deferred"
    except DependencyUnavailable:
        _quietly(lambda: c.store.release(m, None))
        raise
    except Exception as exc:  # a bad message must not fail its neighbours
        log.exception("message %s failed unexpectedly", m.id)
        c.store.fail(m, f"internal error: {type(exc).__name__}", None)
        return "failed"


def _attempt_until_done(
    c: Container, m: ClaimedMessage, providers: list[Provider], deadline: Deadline, call_budget: float
) -> str:
    s = c.settings
    candidates = [p for p in providers if p.status == "active"]
    if not candidates:
        c.store.fail(m, "The queue has no usable provider (deleted or out of quota).", None, counted=False)
        return "failed"
    headroom = Headroom(s.limiter_guard_s, s.limiter_margin)
    costs = [tokens.estimate(p, m.request) if p.token_limit else 0 for p in candidates]
    limits = [provider_limits(p, headroom, cost) for p, cost in zip(candidates, costs, strict=True)]
    failing: set[int] = set()  # providers that just failed with 5xx/timeouts: try the others first
    budget = lambda: deadline.remaining() - call_budget - SAFETY_S  # noqa: E731
    while True:
        usable = [i for i in range(len(candidates)) if i not in failing] or list(range(len(candidates)))
        free, places = take_places(c, candidates, usable, call_budget + 30)
        if not free:  # every provider is at its max_concurrency: wait for one to free a place
            if budget() < 0:
                dispatch.defer(c, m, 1.0, None)
                return "deferred"
            c.limiter.wait_for_release([concurrency_key(candidates[i]) for i in usable], min(1.0, budget()))
            continue
        chosen: int | None = None
        try:
            chosen, wait_s = take_slot(
                c, [limits[i] for i in free], budget, [candidates[i].weight for i in free]
            )
        finally:
            give_back(c, candidates, places, keep=None if chosen is None else free[chosen])
        if chosen is None:
            dispatch.defer(c, m, wait_s, None)
            return "deferred"
        index = free[chosen]
        provider = candidates[index]
        try:
            try:
                result = c.providers.call(provider, m.request)
            finally:
                give_back(c, candidates, {index: places[index]} if index in places else {}, keep=None)
        except ProviderRejected as exc:
            if isinstance(exc, QuotaExhausted):
                c.store.set_provider_status(provider.id, "quota_exhausted", exc.detail)
            c.store.fail(m, exc.detail, provider)
            return "failed"
        except RateLimited as exc:
            # Every worker waits until the provider's reset; this try is not counted.
            pause = exc.retry_after_s or backoff_s(1, base=1.0)
            log.warning("429 from %s; all workers wait %.2fs", provider.name, pause)
            c.limiter.settle(settlement(provider, headroom, costs[index], 0))
            c.limiter.push(limits[index], pause)
            pause, counted, error = 0.0, False, exc.detail
        except ProviderError as exc:
            if m.tries + 1 >= s.max_attempts:
                c.store.fail(m, f"gave up after {m.tries + 1} attempts: {exc.detail}", provider)
                return "failed"
            pause = getattr(exc, "retry_after_s", None) or backoff_s(m.tries + 1)
            failing.add(index)
            counted, error = True, exc.detail
        else:
            used = tokens.charged(
                provider, m.request, result.usage.prompt_tokens, result.usage.completion_tokens
            )
            c.limiter.settle(settlement(provider, headroom, costs[index], used))
            react_to_headers(c, provider, limits[index], result.headers)
            return "completed" if c.store.complete(m, provider, result) else "lost"
        if pause > budget():
            dispatch.defer(c, m, pause, error)
            return "deferred"
        time.sleep(pause)
        renewed = c.store.renew(m, deadline.remaining() + 30, counted, error)
        if renewed is None:
            return "lost"
        m = renewed


def take_places(
    c: Container, candidates: list[Provider], usable: list[int], lease_s: float
) -> tuple[list[int], dict[int, str]]:
    """Of `usable`, the providers with room for one more request in flight, and the leases
    taken on those that cap it (`max_concurrency`)."""
    free, places = [], {}
    for i in usable:
        p = candidates[i]
        if not p.max_concurrency:
            free.append(i)
        elif lease := c.limiter.acquire(concurrency_key(p), p.max_concurrency, lease_s):
            free.append(i)
            places[i] = lease
    return free, places


def give_back(c: Container, candidates: list[Provider], places: dict[int, str], keep: int | None) -> None:
    for i, lease in places.items():
        if i != keep:
            c.limiter.release(concurrency_key(candidates[i]), lease)


def react_to_headers(c: Container, provider: Provider, limits: list[Limit], headers: dict[str, str]) -> None:
    """A provider that says a limit is used up holds every worker until its reset."""
    for used_up in exhausted(headers):
        if used_up.kind == "requests":
            c.limiter.push(limits[:1], used_up.reset_s)  # provider_limits puts requests first
        elif provider.token_limit:
            c.limiter.push([lim for lim in limits if lim.key == token_key(provider)], used_up.reset_s)


def take_slot(
    c: Container, limits: list[list[Limit]], max_wait: Callable[[], float], weights: Sequence[float] = ()
) -> tuple[int | None, float]:
    """Reserve the soonest slot and sleep until it: (candidate index, 0), or (None, wait) when
    no slot starts in time.

    The limiter says when the slot starts on this clock within the error of its clock offset.
    Sleeping to the latest bound means never sending early; a worker that wakes up later than
    LIMITER_LATE_S after the earliest bound gives its slot up and takes a fresh one, so a stall
    leaves a gap in the schedule instead of a burst that would overfill the provider's window."""
    index: int | None = None
    for _ in range(MAX_LATE_WAKEUPS):
        budget = max_wait()
        if budget < 0:
            return None, 1.0
        slot = c.limiter.reserve(limits, budget, weights)
        if not slot.reserved:
            return None, slot.wait_s
        index = slot.index
        time.sleep(max(slot.latest - time.monotonic(), 0.0))
        late = time.monotonic() - slot.earliest
        if late <= c.settings.limiter_late_s:
            break
        log.debug("%.1f ms after the slot; taking a fresh one", late * 1e3)
    return index, 0.0


def _quietly(action: Callable[[], object]) -> None:
    try:
        action()
    except Exception:  # best effort while a dependency is down
        log.debug("best-effort action failed", exc_info=True)
