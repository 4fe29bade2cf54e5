"""One message's way through the worker: a slot on the provider of its queue that serves
soonest, the call, and the answer stored; after a failed call, what `decisions.on_error` says.

Whole-batch retry is the cloud's rule, so one bad message never raises: its failure is
recorded in Postgres. Only an unreachable dependency raises, so the batch is delivered again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..adapters.egress import Departure
from ..domain import tokens
from ..domain.backoff import backoff_s
from ..domain.decisions import OnError, on_error, out_of_tries
from ..domain.feedback import exhausted
from ..domain.limits import Headroom, Limit, concurrency_key, provider_limits, settlement, token_key
from ..domain.models import ClaimedMessage, Provider, ProviderResult
from ..errors import (
    DependencyUnavailable,
    LateForSlot,
    LimiterUnavailable,
    ProviderError,
    RateLimited,
)
from ..ports import SHUTTING_DOWN, SYSTEM_CLOCK, Clock, WorkerPorts
from . import dispatch
from .intake import Ticket

log = logging.getLogger(__name__)
T = TypeVar("T")
SAFETY_S = 1.0  # never plan work into the last second of an invocation
MAX_LATE_WAKEUPS = 5
RETIME_WAIT_S = 1.0  # a request late at its departure waits this long at most for a fresh slot
LIMITER_RETRY_S = 5.0  # how long a message waits when Redis is unreachable
LEASE_S = 20.0  # a message's lease, which its invocation extends while it works on it
STEADY_S = 30.0  # how long a write of a message's progress is tried again while a dependency blips


@dataclass(frozen=True)
class Deadline:
    at: float  # on `clock`
    clock: Clock = SYSTEM_CLOCK

    @classmethod
    def after(cls, seconds: float, clock: Clock = SYSTEM_CLOCK) -> Deadline:
        return cls(clock.monotonic() + seconds, clock)

    def remaining(self) -> float:
        return 0.0 if SHUTTING_DOWN.is_set() else self.at - self.clock.monotonic()


class Deferral(Exception):
    """No slot starts in the invocation's time: the message comes back after `wait_s`."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(wait_s)
        self.wait_s = wait_s


@dataclass(frozen=True)
class Slot:
    wait_s: float = 1.0  # no slot: how long until one could start
    earliest: float = 0.0  # the slot's start on this clock lies in [earliest, latest]
    latest: float = 0.0
    waited_s: float = 0.0  # from first asking until the slot
    slot_us: int = 0  # its start on the limiter's clock
    limits: Sequence[Limit] = ()  # the limits it was taken on


def late_error(late_s: float) -> LateForSlot:
    return LateForSlot(f"the request would have left {late_s * 1e3:.1f} ms after its slot", late_s)


def process(
    c: WorkerPorts,
    m: ClaimedMessage,
    providers: list[Provider],
    deadline: Deadline,
    call_budget: float,
    ticket: Ticket | None = None,
) -> str:
    ticket = ticket or Ticket.untracked()
    held = Held(m)
    try:
        return attempt_until_done(c, held, providers, deadline, call_budget, ticket)
    except LimiterUnavailable as exc:
        # Without the shared limiter nothing may be sent: the message waits, nothing fails.
        log.warning("limiter unreachable; message %s waits %.0fs: %s", m.id, LIMITER_RETRY_S, exc.detail)
        try:
            Steady(c, deadline).defer(
                held.m, LIMITER_RETRY_S, "waiting for the rate limiter (redis unreachable)"
            )
        except DependencyUnavailable:
            quietly(c.store.release, held.m, None)
            raise
        return "deferred"
    except DependencyUnavailable:
        quietly(c.store.release, held.m, None)
        raise
    except Exception as exc:  # a bad message must not fail its neighbours
        log.exception("message %s failed unexpectedly", m.id)
        return unexpected(c, held.m, f"internal error: {type(exc).__name__}", deadline)


@dataclass
class Held:
    """The claim a message is worked on under; each renewal replaces it."""

    m: ClaimedMessage


@dataclass(frozen=True)
class Steady:
    """The writes of a message's progress, each tried again while Postgres (or, for a deferral,
    the broker) blips (`through_blips`, for at most STEADY_S and while the invocation has
    time): a blip of seconds costs neither the message nor its neighbours anything. Each write
    is fenced by the message's attempt (a provider's status by its version): one that did
    commit before its reply was lost does nothing more when tried again, and the message is
    then taken for lost here, as if its lease had been taken over (the sweeper gives it back
    once that lease runs out)."""

    c: WorkerPorts
    deadline: Deadline

    def _steadily(self, what: str, action: Callable[[], T]) -> T:
        left = lambda: self.deadline.remaining() - SAFETY_S  # noqa: E731
        return through_blips(action, STEADY_S, left, what, self.c.clock)

    def complete(self, m: ClaimedMessage, provider: Provider, result: ProviderResult) -> bool:
        """A paid answer: given up, the message comes again and its provider is called again."""
        return self._steadily(
            f"storing the answer to {m.id}", lambda: self.c.store.complete(m, provider, result)
        )

    def fail(
        self,
        m: ClaimedMessage,
        error: str,
        provider: Provider | None,
        counted: bool = True,
        dead_letter: bool = False,
    ) -> bool:
        """`dead_letter`: it used up its tries, and a copy goes to its queue's dead-letter queue."""
        failed = self._steadily(
            f"failing {m.id}", lambda: self.c.store.fail(m, error, provider, counted, dead_letter=dead_letter)
        )
        if failed and dead_letter:
            row = {"id": m.id, "tenant_id": m.tenant_id, "queue_id": m.queue_id, "last_error": error}
            dispatch.rest_dead(self.c, [row])
        return failed

    def renew(self, m: ClaimedMessage, counted: bool, error: str) -> ClaimedMessage | None:
        return self._steadily(f"renewing {m.id}", lambda: self.c.store.renew(m, LEASE_S, counted, error))

    def defer(self, m: ClaimedMessage, delay_s: float, note: str | None) -> None:
        self._steadily(f"handing back {m.id}", lambda: dispatch.defer(self.c, m, delay_s, note))

    def provider_status(self, provider: Provider, status: str, error: str) -> None:
        """Unless the provider's key was replaced since it was loaded."""
        self._steadily(
            f"marking {provider.name} {status}",
            lambda: self.c.store.set_provider_status(provider.id, status, error, provider.version or None),
        )


def unexpected(c: WorkerPorts, m: ClaimedMessage, error: str, deadline: Deadline) -> str:
    """An error of the worker's own while it works on a message spends a try, as a dropped
    connection would: the message comes back after a backoff until its tries are used up,
    and then it is dead-lettered. So one that always crashes ends, and its neighbours go on."""
    steady = Steady(c, deadline)
    spent = out_of_tries(m.tries, c.settings.max_attempts, error)
    if spent is not None:
        return "dead_lettered" if steady.fail(m, spent.error, None, dead_letter=True) else "lost"
    renewed = steady.renew(m, True, error)
    if renewed is None:
        return "lost"
    steady.defer(renewed, backoff_s(renewed.tries, floor=0.5), error)
    return "deferred"


@dataclass(frozen=True)
class Plan:
    """A message's usable providers with what it costs on each of their limits."""

    providers: list[Provider]
    costs: list[int]  # estimated tokens, for providers with a token limit
    limits: list[list[Limit]]
    headroom: Headroom

    @classmethod
    def of(cls, c: WorkerPorts, m: ClaimedMessage, providers: list[Provider], guard_s: float) -> Plan:
        headroom = Headroom(guard_s, c.settings.limiter_margin)
        usable = [p for p in providers if p.status == "active"]
        costs = [tokens.estimate(p, m.request) if p.token_limit else 0 for p in usable]
        limits = [provider_limits(p, headroom, cost) for p, cost in zip(usable, costs, strict=True)]
        return cls(usable, costs, limits, headroom)

    def without(self, i: int) -> Plan:
        keep = [j for j in range(len(self.providers)) if j != i]
        return Plan(
            [self.providers[j] for j in keep],
            [self.costs[j] for j in keep],
            [self.limits[j] for j in keep],
            self.headroom,
        )


def attempt_until_done(
    c: WorkerPorts,
    held: Held,
    providers: list[Provider],
    deadline: Deadline,
    call_budget: float,
    ticket: Ticket,
) -> str:
    """The sequence: a slot on the provider that serves soonest, the call, the answer stored;
    after a failed call, what `on_error` decides."""
    m, s, steady = held.m, c.settings, Steady(c, deadline)
    plan = Plan.of(c, m, providers, ticket.guard_s(s.limiter_guard_s, s.limiter_late_s))
    if not plan.providers:
        steady.fail(m, "The queue has no usable provider (deleted or out of quota).", None, counted=False)
        return "failed"
    failing: set[int] = set()  # providers that just failed with 5xx/timeouts: try the others first
    budget = lambda: deadline.remaining() - call_budget - SAFETY_S  # noqa: E731
    while True:
        try:
            index, departure, lease = take_provider(c, plan, failing, budget, ticket)
        except Deferral as deferral:
            ticket.no_slot_until(c.clock.monotonic() + deferral.wait_s)
            steady.defer(m, deferral.wait_s, None)
            return "deferred"
        provider = plan.providers[index]
        try:
            result = c.providers.call(provider, m.request, departure)
        except LateForSlot:
            continue  # nothing was sent, and its slot was given back (`retime`): start again
        except ProviderError as exc:
            if isinstance(exc, RateLimited):
                ticket.rate_limited(provider.id)
            decision = on_error(exc, m.tries, c.settings.max_attempts)
            if decision.quota_exhausted:
                steady.provider_status(provider, "quota_exhausted", decision.error)  # until a new key
                if len(plan.providers) > 1:  # the queue's others take it; the try was not its fault
                    plan, failing = plan.without(index), {j - (j > index) for j in failing if j != index}
                    continue
            if not carry_out(c, steady, m, plan, index, decision):
                return "dead_lettered" if decision.dead_letter else "failed"
            # The try is counted (unless it was a 429) before anything else, so that a message
            # handed back for a pause it cannot wait here still runs out of tries.
            renewed = steady.renew(m, decision.counted, decision.error)
            if renewed is None:
                return "lost"
            m = held.m = renewed
            if decision.pause_s > budget():
                steady.defer(m, decision.pause_s, decision.error)
                return "deferred"
            if decision.avoid_provider:
                failing.add(index)
            c.clock.sleep(decision.pause_s)
        else:
            # The answer is paid for: store it first; what the limiter learns from it is best
            # effort (a lost settlement only leaves the schedule more careful than it need be).
            stored = steady.complete(m, provider, result)
            used = tokens.charged(
                provider, m.request, result.usage.prompt_tokens, result.usage.completion_tokens
            )
            quietly(c.limiter.settle, settlement(provider, plan.headroom, plan.costs[index], used))
            quietly(react_to_headers, c, provider, plan.limits[index], result.headers)
            return "completed" if stored else "lost"
        finally:
            if lease is not None:  # it expires by itself if Redis cannot be told
                quietly(c.limiter.release, concurrency_key(provider), lease)
            if departure.sent_at is not None and departure.left_at is not None:
                # Measured to when the write returned: what the check just before it cannot
                # see (the write itself, on a busy machine) is what the guard has to cover.
                write_s = departure.left_at - departure.sent_at
                ticket.departed(provider.id, departure.left_at - departure.slot_at, write_s)


def through_blips(
    action: Callable[[], T], most_s: float, left: Callable[[], float], what: str, clock: Clock = SYSTEM_CLOCK
) -> T:
    """`action()`, tried again while a dependency is unreachable, with pauses growing from
    0.1 s to 2 s, for at most `most_s` in all and while `left()` has room for the pause."""
    pause, waited = 0.1, 0.0
    while True:
        try:
            return action()
        except DependencyUnavailable as exc:
            if waited + pause > most_s or pause > left():
                raise
            log.warning("%s failed; again in %.1fs: %s", what, pause, exc.detail)
            clock.sleep(pause)
            waited += pause
            pause = min(pause * 2, 2.0)


def carry_out(
    c: WorkerPorts, steady: Steady, m: ClaimedMessage, plan: Plan, index: int, decision: OnError
) -> bool:
    """Do what `on_error` decided for the provider, and fail the message if it is not retried;
    whether it is retried."""
    provider = plan.providers[index]
    if decision.hold_provider_s is not None:
        log.warning("429 from %s; all workers wait %.2fs", provider.name, decision.hold_provider_s)
        c.limiter.settle(settlement(provider, plan.headroom, plan.costs[index], 0))
        c.limiter.push(plan.limits[index], decision.hold_provider_s)
    if not decision.retry:
        steady.fail(m, decision.error, provider, dead_letter=decision.dead_letter)
    return decision.retry


@dataclass
class SlotDeparture(Departure):
    """A departure from a limiter slot; late, it is retimed in place (`retime_in_place`)."""

    slot: Slot = Slot()
    retimed: int = 0
    ports: WorkerPorts | None = None  # None: never retimed
    budget: Callable[[], float] = lambda: 0.0
    ticket: Ticket = field(default_factory=Ticket.untracked)
    provider_id: str = ""

    def retime(self, late_s: float) -> bool:
        if self.ports is None:
            return False
        return retime_in_place(self.ports, self, self.budget, self.ticket, self.provider_id, late_s)

    @property
    def slot_at(self) -> float:
        return self.slot.earliest


def retime_in_place(
    c: WorkerPorts,
    departure: SlotDeparture,
    budget: Callable[[], float],
    ticket: Ticket,
    provider_id: str,
    late_s: float,
) -> bool:
    """A request `late_s` past its departure, connection in hand, gives its slot back and waits
    there for a fresh one on the same provider if one starts within RETIME_WAIT_S (True);
    otherwise (False) it is not sent and starts again with a choice of provider. Either way
    the lateness is counted and the slot given back here, once."""
    old = departure.slot
    log.debug("%.1f ms after the slot at departure; a fresh one", (late_s + c.settings.limiter_late_s) * 1e3)
    ticket.held_back(provider_id)
    try:
        c.limiter.refund(old.limits, old.slot_us)
        departure.slot = Slot()  # given back: nothing left to refund
        departure.retimed += 1
        if departure.retimed > MAX_LATE_WAKEUPS or SHUTTING_DOWN.is_set():
            return False
        asked = old.latest - old.waited_s
        index, slot = reserve_slot(c, [list(old.limits)], min(budget(), RETIME_WAIT_S), (), asked)
    except LimiterUnavailable:  # taking the next slot says so again
        return False
    if index is None:
        return False
    departure.slot = slot
    departure.leave_by = slot.earliest + c.settings.limiter_late_s
    ticket.slot(slot.latest, slot.waited_s, provider_id)
    return True


def take_provider(
    c: WorkerPorts, plan: Plan, failing: set[int], budget: Callable[[], float], ticket: Ticket
) -> tuple[int, SlotDeparture, str | None]:
    """A place (under `max_concurrency`) and a slot on the provider that serves soonest, slept
    until; (index, when the request must leave, the place's lease). Raises Deferral when no
    slot starts before the invocation's time runs out."""
    providers = plan.providers
    while True:
        usable = [i for i in range(len(providers)) if i not in failing] or list(range(len(providers)))
        # A place is held while the message waits for its slot and during the call.
        lease_s = max(budget(), 0.0) + c.settings.provider_timeout_s + 30
        free, places = take_places(c, providers, usable, lease_s)
        if not free:  # every provider is at its max_concurrency: wait for one to free a place
            if budget() < 0:
                raise Deferral(1.0)
            c.limiter.wait_for_release([concurrency_key(providers[i]) for i in usable], min(1.0, budget()))
            continue
        chosen: int | None = None

        def keep_only(i: int, free: list[int] = free, places: dict[int, str] = places) -> None:
            """The slot is on free[i]: the places taken on the others go back before the sleep."""
            give_back(c, providers, places, keep=free[i])
            for j in [j for j in places if j != free[i]]:
                del places[j]

        try:
            chosen, slot = take_slot(
                c,
                [plan.limits[i] for i in free],
                budget,
                [providers[i].weight for i in free],
                lambda i, late, free=free: ticket.held_back(providers[free[i]].id),  # type: ignore[misc]
                keep_only,
            )
            if chosen is not None:
                ticket.slot(slot.latest, slot.waited_s, providers[free[chosen]].id)
        finally:
            give_back(c, providers, places, keep=None if chosen is None else free[chosen])
        if chosen is None:
            raise Deferral(slot.wait_s)
        index = free[chosen]
        departure = SlotDeparture(
            leave_by=slot.earliest + c.settings.limiter_late_s,
            on_late=lambda over: late_error(over + c.settings.limiter_late_s),  # from the slot
            slot=slot,
            ports=c,
            budget=budget,
            ticket=ticket,
            provider_id=providers[index].id,
        )
        return index, departure, places.get(index)


def take_places(
    c: WorkerPorts, candidates: list[Provider], usable: list[int], lease_s: float
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


def give_back(c: WorkerPorts, candidates: list[Provider], places: dict[int, str], keep: int | None) -> None:
    for i, lease in places.items():
        if i != keep:
            c.limiter.release(concurrency_key(candidates[i]), lease)


def react_to_headers(
    c: WorkerPorts, provider: Provider, limits: list[Limit], headers: dict[str, str]
) -> None:
    """A provider that says a limit is used up holds every worker until its reset."""
    for used_up in exhausted(headers):
        if used_up.kind == "requests":
            c.limiter.push(limits[:1], used_up.reset_s)  # provider_limits puts requests first
        elif provider.token_limit:
            c.limiter.push([lim for lim in limits if lim.key == token_key(provider)], used_up.reset_s)


def take_slot(
    c: WorkerPorts,
    limits: list[list[Limit]],
    max_wait: Callable[[], float],
    weights: Sequence[float] = (),
    on_late: Callable[[int, float], None] = lambda index, late_s: None,
    on_reserved: Callable[[int], None] = lambda index: None,
) -> tuple[int | None, Slot]:
    """Reserve the soonest slot and sleep until it: (candidate index, the slot), or (None, how
    long until one could start) when no slot starts in time.

    The limiter says when the slot starts on this clock within the error of its clock offset.
    Sleeping to the latest bound means never sending early; a worker that wakes up later than
    LIMITER_LATE_S after the earliest bound gives its slot up and takes a fresh one (and the
    request itself is not sent later than that either: `Departure`), so a stall leaves a gap in
    the schedule instead of a burst that would overfill the provider's window.

    `on_reserved(index)` runs once a slot is reserved, before the sleep; a fresh slot after a
    late wake-up is taken on the same candidate."""
    asked = c.clock.monotonic()
    candidates = list(range(len(limits)))
    for _ in range(MAX_LATE_WAKEUPS):
        budget = max_wait()
        if budget < 0:
            return None, Slot(1.0)
        found, slot = reserve_slot(
            c,
            [limits[i] for i in candidates],
            budget,
            [weights[i] if i < len(weights) else 1.0 for i in candidates],
            asked,
            lambda k, candidates=candidates: on_reserved(candidates[k]),  # type: ignore[misc]
        )
        if found is None:
            return None, slot
        index = candidates[found]
        if SHUTTING_DOWN.is_set():  # woken to stop: the slot goes back, the message with it
            c.limiter.refund(slot.limits, slot.slot_us)
            return None, Slot(1.0)
        late = c.clock.monotonic() - slot.earliest
        if late <= c.settings.limiter_late_s:
            return index, slot
        log.debug("%.1f ms after the slot; taking a fresh one", late * 1e3)
        on_late(index, late)
        c.limiter.refund(slot.limits, slot.slot_us)
        candidates = [index]
    return None, Slot(1.0)  # late every time: the machine is too busy now; the message comes back


def reserve_slot(
    c: WorkerPorts,
    limits: Sequence[Sequence[Limit]],
    max_wait_s: float,
    weights: Sequence[float],
    asked: float,
    on_reserved: Callable[[int], None] = lambda index: None,
) -> tuple[int | None, Slot]:
    """Reserve the soonest slot starting within `max_wait_s` and sleep until it: (candidate
    index, the slot), or (None, how long until one could start)."""
    reservation = c.limiter.reserve(limits, max_wait_s, weights)
    if not reservation.reserved:
        return None, Slot(reservation.wait_s)
    on_reserved(reservation.index)
    c.clock.sleep(max(reservation.latest - c.clock.monotonic(), 0.0))
    slot = Slot(
        0.0,
        reservation.earliest,
        reservation.latest,
        reservation.latest - asked,
        reservation.slot_us,
        limits[reservation.index],
    )
    return reservation.index, slot


def quietly(action: Callable[..., object], *args: Any) -> None:
    try:
        action(*args)
    except Exception:  # best effort while a dependency is down
        log.warning("best-effort %s failed", getattr(action, "__name__", "action"), exc_info=True)
