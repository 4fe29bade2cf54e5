"""The worker's decisions on in-memory ports (`tests/fakes.py`): no I/O, time on a FakeClock.

Each test runs one message through `processing.process` and reads what the fakes were left
with: the message's row, the limiter's schedule, the calls the provider got, what was parked.
"""

from __future__ import annotations

import gc
import math
from collections import deque

import pytest
from ai_rate_limiter.adapters.postgres import provider_from_row
from ai_rate_limiter.domain.decisions import on_error
from ai_rate_limiter.domain.limits import (
    Headroom,
    concurrency_key,
    per_token_us,
    provider_limits,
    request_limit,
    token_key,
)
from ai_rate_limiter.domain.models import Provider
from ai_rate_limiter.errors import (
    DependencyUnavailable,
    LateForSlot,
    NotFound,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
)
from ai_rate_limiter.ports import WorkerPorts
from ai_rate_limiter.services.dispatch import message_body
from ai_rate_limiter.services.intake import GUARD_MIN_SAMPLES, Intake, Ticket
from ai_rate_limiter.services.processing import (
    LIMITER_RETRY_S,
    MAX_LATE_WAKEUPS,
    RETIME_WAIT_S,
    SHUTTING_DOWN,
    Deadline,
    process,
)

from tests.fakes import FakePorts, Outcome, T, answer

Q = "q1"


@pytest.fixture()
def ports() -> FakePorts:
    built = FakePorts.build()
    _typed: WorkerPorts = built  # the fakes are the worker's ports, as the container is
    return built


def queue(ports: FakePorts, **fields: object) -> Provider:
    """A queue Q with one provider (these fields of its row): the Provider the worker loads."""
    row = ports.store.add_provider(**fields)
    ports.store.add_queue(Q, row)
    return provider_from_row(row)


def headroom(ports: FakePorts) -> Headroom:
    return Headroom(ports.settings.limiter_guard_s, ports.settings.limiter_margin)


def run(
    ports: FakePorts,
    mid: str,
    deadline_s: float = 60.0,
    call_budget_s: float = 10.0,
    ticket: Ticket | None = None,
    lease_s: float | None = None,
) -> str:
    """Claim the message and process it as an invocation with `deadline_s` left would."""
    [m] = ports.store.claim([mid], lease_s=deadline_s + 30 if lease_s is None else lease_s)
    providers = [provider_from_row(r, w) for r, w in ports.store.queue_providers(m.tenant_id, m.queue_id)]
    deadline = Deadline.after(deadline_s, ports.clock)
    return process(ports, m, providers, deadline, call_budget_s, ticket)


def us(seconds: float) -> int:
    return round(seconds * 1_000_000)


# -- what a failed call leads to ------------------------------------------------------------------


def test_a_429_holds_the_provider_costs_no_try_and_the_next_call_completes(ports: FakePorts) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, RateLimited("fake: HTTP 429: slow down", retry_after_s=2.0), answer("hi"))
    t0 = ports.clock.now_us

    assert run(ports, mid) == "completed"

    key = request_limit(p, headroom(ports)).key
    assert ports.limiter.pushes == [((key,), 2.0)]  # every worker holds for the retry-after
    first, second = ports.providers.sent()
    assert us(first.at) == t0 and us(second.at) == t0 + us(2.0)  # the next slot was after the hold
    m = ports.store.messages[mid]
    assert (m.status, m.tries, m.attempt) == ("completed", 1, 2)  # renewed once, the 429 not counted
    assert m.result is not None and m.result.text == "hi" and m.last_error is None


def test_insufficient_quota_fails_the_message_and_stops_the_provider(ports: FakePorts) -> None:
    p = queue(ports)
    first, second = ports.store.add_message(Q), ports.store.add_message(Q)
    ports.providers.script(p.id, QuotaExhausted("fake: HTTP 429: insufficient_quota"))

    assert run(ports, first) == "failed"

    m = ports.store.messages[first]
    assert (m.status, m.tries, m.provider_id) == ("failed", 1, p.id)
    assert m.last_error is not None and "insufficient_quota" in m.last_error
    assert ports.store.providers[p.id]["status"] == "quota_exhausted"
    assert ports.store.providers[p.id]["status_detail"] == m.last_error
    assert ports.limiter.pushes == []  # not a rate limit: nobody is held
    # The next message of the queue loads the provider as stopped: nothing is sent.
    assert run(ports, second) == "failed"
    assert len(ports.providers.calls) == 1 and ports.store.messages[second].tries == 0


def test_a_provider_out_of_quota_passes_its_message_to_the_queues_other_provider(ports: FakePorts) -> None:
    a, b = ports.store.add_provider(name="a"), ports.store.add_provider(name="b")
    ports.store.add_queue(Q, a, b)
    mid = ports.store.add_message(Q)
    ports.providers.script(a["id"], QuotaExhausted("a: HTTP 429: insufficient_quota"))
    ports.providers.script(b["id"], answer("from b"))

    assert run(ports, mid) == "completed"

    assert [c.provider_id for c in ports.providers.calls] == [a["id"], b["id"]]
    m = ports.store.messages[mid]
    assert (m.status, m.provider_name, m.tries) == ("completed", "b", 1)  # the quota cost no try
    assert ports.store.providers[a["id"]]["status"] == "quota_exhausted"


def test_a_late_quota_error_does_not_stop_a_provider_whose_key_was_replaced(ports: FakePorts) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, QuotaExhausted("fake: HTTP 429: insufficient_quota"))

    def key_replaced(_: Provider) -> None:  # while the old key's call is out
        ports.store.providers[p.id].update(api_key="sk-new", updated_at=10_000)

    ports.providers.before_send = key_replaced

    assert run(ports, mid) == "failed"
    assert ports.store.providers[p.id]["status"] == "active"


def test_a_5xx_on_one_provider_moves_the_retry_to_the_other(ports: FakePorts) -> None:
    a, b = ports.store.add_provider(name="a"), ports.store.add_provider(name="b")
    ports.store.add_queue(Q, a, b)
    mid = ports.store.add_message(Q)
    ports.providers.script(a["id"], ProviderUnavailable("a: HTTP 503: overloaded"))
    ports.providers.script(b["id"], answer("from b"))

    assert run(ports, mid) == "completed"

    assert [c.provider_id for c in ports.providers.calls] == [a["id"], b["id"]]
    m = ports.store.messages[mid]
    assert (m.status, m.provider_name, m.tries, m.attempt) == ("completed", "b", 2, 2)


def test_after_max_attempts_the_message_fails_with_the_last_error(ports: FakePorts) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q)
    n = ports.settings.max_attempts
    ports.providers.script(p.id, *[ProviderUnavailable(f"fake: HTTP 500: boom {i}") for i in range(n)])

    assert run(ports, mid) == "dead_lettered"

    assert len(ports.providers.sent()) == n
    m = ports.store.messages[mid]
    assert (m.status, m.tries, m.dead_lettered) == ("failed", n, True)
    assert m.last_error == f"gave up after {n} attempts: fake: HTTP 500: boom {n - 1}"
    assert ports.broker.dead == [
        (ports.names(T, Q), message_body(T, mid), m.last_error)
    ]  # a copy, after its row


def test_a_message_that_already_spent_its_tries_fails_after_one_more(ports: FakePorts) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q, tries=ports.settings.max_attempts - 1)
    ports.providers.script(p.id, ProviderUnavailable("fake: HTTP 502"))

    assert run(ports, mid) == "dead_lettered"
    assert len(ports.providers.calls) == 1
    assert ports.store.messages[mid].tries == ports.settings.max_attempts


def test_an_error_of_the_workers_own_spends_a_try_and_comes_back_after_a_backoff(ports: FakePorts) -> None:
    queue(ports)
    mid = ports.store.add_message(Q)

    def crash(p: Provider) -> None:
        raise KeyError("a bug")

    ports.providers.before_send = crash

    assert run(ports, mid) == "deferred"

    m = ports.store.messages[mid]
    assert (m.status, m.tries, m.last_error, m.dead_lettered) == (
        "queued",
        1,
        "internal error: KeyError",
        False,
    )
    [(_, _, delay_s)] = ports.broker.delayed
    assert 0.25 <= delay_s <= 0.5  # the first backoff


def test_a_message_that_always_crashes_its_worker_is_dead_lettered_after_its_tries(ports: FakePorts) -> None:
    queue(ports)
    mid = ports.store.add_message(Q)
    n = ports.settings.max_attempts

    def crash(p: Provider) -> None:
        raise TypeError("a bug")

    ports.providers.before_send = crash

    outcomes = [run(ports, mid) for _ in range(n)]

    assert outcomes == ["deferred"] * (n - 1) + ["dead_lettered"]
    m = ports.store.messages[mid]
    assert (m.status, m.tries, m.dead_lettered) == ("failed", n, True)
    assert m.last_error == f"gave up after {n} attempts: internal error: TypeError"
    assert ports.broker.dead == [(ports.names(T, Q), message_body(T, mid), m.last_error)]


def test_a_lease_that_ran_out_counts_as_a_try(ports: FakePorts) -> None:
    queue(ports)
    mid = ports.store.add_message(Q)
    [first] = ports.store.claim([mid], lease_s=20.0)  # its worker dies holding it
    ports.clock.advance(21.0)
    [again] = ports.store.claim([mid], lease_s=20.0)
    assert (first.tries, again.tries, again.attempt) == (0, 1, first.attempt + 1)


# -- when no slot or pause fits the invocation ----------------------------------------------------


def test_no_slot_before_the_deadline_defers_the_message(ports: FakePorts) -> None:
    p = queue(ports, request_limit=1, time_window=30.0)
    ports.limiter.reserve([provider_limits(p, headroom(ports))], 0)  # another worker took the slot
    mid = ports.store.add_message(Q)

    assert run(ports, mid, deadline_s=20.0, call_budget_s=5.0) == "deferred"

    next_slot_s = request_limit(p, headroom(ports)).increment_us / 1e6
    assert ports.broker.delayed == [(ports.names(T, Q), message_body(T, mid), next_slot_s)]
    m = ports.store.messages[mid]
    assert (m.status, m.lease_until, m.tries, m.unpublished) == ("queued", None, 0, False)
    assert ports.providers.calls == [] and len(ports.limiter.booked) == 1  # nothing reserved for it


def test_a_deferral_whose_delayed_copy_is_refused_is_left_to_the_relay(ports: FakePorts) -> None:
    """The delay queue refuses the message (deleted meanwhile, say): the row stays queued and
    unpublished, so the relay publishes it, instead of being stranded with no broker copy."""
    p = queue(ports, request_limit=1, time_window=30.0)
    ports.limiter.reserve([provider_limits(p, headroom(ports))], 0)
    mid = ports.store.add_message(Q)

    def refused(*args: object) -> None:
        raise NotFound("The delay queue does not exist.")

    ports.broker.publish_delayed = refused  # type: ignore[method-assign,assignment]

    assert run(ports, mid, deadline_s=20.0, call_budget_s=5.0) == "deferred"
    m = ports.store.messages[mid]
    assert (m.status, m.unpublished) == ("queued", True)


def test_a_pause_longer_than_the_budget_defers_and_counts_the_try(ports: FakePorts) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, ProviderUnavailable("fake: HTTP 503: back later", retry_after_s=120.0))

    assert run(ports, mid, deadline_s=60.0, call_budget_s=10.0) == "deferred"

    assert ports.broker.delayed == [(ports.names(T, Q), message_body(T, mid), 120.0)]
    m = ports.store.messages[mid]
    assert (m.status, m.last_error) == ("queued", "fake: HTTP 503: back later")
    assert m.tries == 1  # the call was made, and counts


def test_a_provider_that_always_asks_for_later_still_runs_the_message_out_of_tries(
    ports: FakePorts,
) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q)
    n = ports.settings.max_attempts
    ports.providers.script(p.id, *[ProviderUnavailable("fake: HTTP 503", retry_after_s=120.0)] * n)

    outcomes = [run(ports, mid) for _ in range(n)]  # each delivery after the last one's delay

    assert outcomes == ["deferred"] * (n - 1) + ["dead_lettered"]
    m = ports.store.messages[mid]
    assert (m.status, m.tries, m.last_error) == ("failed", n, f"gave up after {n} attempts: fake: HTTP 503")
    assert len(ports.broker.delayed) == n - 1


def test_redis_unreachable_makes_the_message_wait_without_a_try(ports: FakePorts) -> None:
    queue(ports)
    mid = ports.store.add_message(Q)
    ports.limiter.down = True

    assert run(ports, mid) == "deferred"

    assert ports.broker.delayed == [(ports.names(T, Q), message_body(T, mid), LIMITER_RETRY_S)]
    m = ports.store.messages[mid]
    assert (m.status, m.tries) == ("queued", 0)
    assert m.last_error == "waiting for the rate limiter (redis unreachable)"
    assert ports.providers.calls == []


def test_shutting_down_hands_unsent_work_back_at_once(ports: FakePorts) -> None:
    queue(ports)
    mid = ports.store.add_message(Q)
    SHUTTING_DOWN.set()
    try:
        assert run(ports, mid) == "deferred"
    finally:
        SHUTTING_DOWN.clear()
    assert [d for _, _, d in ports.broker.delayed] == [1.0]
    assert ports.providers.calls == [] and ports.store.messages[mid].status == "queued"


# -- keeping to the slot ----------------------------------------------------------------------------


def test_a_late_wake_up_gives_the_slot_back_and_takes_a_fresh_one(ports: FakePorts) -> None:
    p = queue(ports, request_limit=10, time_window=1.0)  # a slot every ~103 ms
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, answer())
    intake = Intake(1.0, 10)
    t0 = ports.clock.now_us
    ports.clock.stall(0.05)  # the sleep until the slot wakes up 50 ms late

    assert run(ports, mid, ticket=intake.ticket()) == "completed"

    lim = request_limit(p, headroom(ports))
    assert ports.limiter.refunds == [((lim.key,), t0, 1)]  # given back: nothing came after it
    assert [b.slot_us for b in ports.limiter.booked] == [t0, t0 + us(0.05)]  # not t0 + 103 ms
    [call] = ports.providers.calls
    assert call.sent and us(call.at) == t0 + us(0.05)
    assert ports.limiter.tat(lim.key) == t0 + us(0.05) + lim.increment_us  # one slot used
    assert (intake.figures[p.id].late, intake.figures[p.id].sent) == (1, 1)
    assert ports.store.messages[mid].tries == 1


def test_a_worker_late_at_every_wake_up_sends_nothing_and_hands_the_message_back(ports: FakePorts) -> None:
    """A machine too busy to wake anything on time: after MAX_LATE_WAKEUPS slots given back, the
    message goes back to the queue for a second instead of spinning through slots."""
    p = queue(ports, request_limit=10, time_window=1.0)
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, answer())
    ports.clock.stall(*[0.05] * (MAX_LATE_WAKEUPS + 1))  # more late wake-ups than one message allows

    assert run(ports, mid) == "deferred"

    assert ports.providers.calls == []  # nothing left late: nothing left at all
    assert len(ports.limiter.refunds) == MAX_LATE_WAKEUPS  # every slot given back
    lim = request_limit(p, headroom(ports))
    assert ports.limiter.tat(lim.key) <= ports.clock.now_us  # no slot of it is left in the schedule
    assert ports.broker.delayed == [(ports.names(T, Q), message_body(T, mid), 1.0)]
    m = ports.store.messages[mid]
    assert (m.status, m.tries) == ("queued", 0)


def test_a_request_late_at_its_departure_takes_a_fresh_slot_where_it_is(ports: FakePorts) -> None:
    """Late with its connection in hand: the slot goes back and the request waits there for a
    fresh one, instead of giving up the connection, its built request and its provider."""
    p = queue(ports, request_limit=10, time_window=1.0)
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, answer("on time"))
    stalls = deque([0.05])  # the first request is held up 50 ms on its way out
    ports.providers.before_send = lambda _: ports.clock.advance(stalls.popleft() if stalls else 0.0)
    intake = Intake(1.0, 10)
    t0 = ports.clock.now_us

    assert run(ports, mid, ticket=intake.ticket()) == "completed"

    [sent] = ports.providers.calls  # one call: not started again
    assert sent.sent and us(sent.at) == t0 + us(0.05)
    lim = request_limit(p, headroom(ports))
    assert ports.limiter.refunds == [((lim.key,), t0, 1)]
    assert [b.slot_us for b in ports.limiter.booked] == [t0, t0 + us(0.05)]
    m = ports.store.messages[mid]
    assert (m.status, m.tries, m.attempt) == ("completed", 1, 1)  # nothing counted, no renewal
    assert (intake.figures[p.id].late, intake.figures[p.id].sent) == (1, 1)


def test_a_late_request_with_no_fresh_slot_soon_is_not_sent_and_starts_over(ports: FakePorts) -> None:
    """When the provider's next slot is further off than RETIME_WAIT_S (another worker took the
    one after it), the late request is not sent; it gives up its connection and waits for its
    next slot as any message does."""
    p = queue(ports, request_limit=1, time_window=1.0)  # a slot every ~1.03 s
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, answer("on time"))
    lim = request_limit(p, headroom(ports))
    stalls = deque([0.05])

    def held_up(_: Provider) -> None:
        if stalls:
            ports.limiter.reserve([[lim]], 10.0)  # another worker takes the next slot meanwhile
            ports.clock.advance(stalls.popleft())

    ports.providers.before_send = held_up
    intake = Intake(1.0, 10)
    t0 = ports.clock.now_us

    assert run(ports, mid, ticket=intake.ticket()) == "completed"

    late, sent = ports.providers.calls
    assert not late.sent and us(late.at) == t0 + us(0.05)
    assert lim.increment_us > us(RETIME_WAIT_S)
    assert sent.sent and us(sent.at) == t0 + 2 * lim.increment_us
    assert ports.limiter.refunds == [((lim.key,), t0, 0)]  # a later slot was taken: it stays used
    assert [b.slot_us for b in ports.limiter.booked] == [t0, t0 + lim.increment_us, t0 + 2 * lim.increment_us]
    assert (intake.figures[p.id].late, intake.figures[p.id].sent) == (1, 1)
    assert ports.store.messages[mid].tries == 1


def test_the_guard_grows_with_the_time_requests_take_to_be_written(ports: FakePorts) -> None:
    """A request leaves within LIMITER_LATE_S of its slot by the check before its write; a
    thread descheduled while writing adds what only the end of the write shows. The guard is
    sized from the time from that check to the end of the write."""
    p = queue(ports, request_limit=1000, time_window=1.0)
    intake = Intake(1.0, 1000)
    ports.providers.write_s = 0.03
    s = ports.settings
    for _ in range(GUARD_MIN_SAMPLES):
        mid = ports.store.add_message(Q)
        ports.providers.script(p.id, answer("ok"))
        assert run(ports, mid, ticket=intake.ticket()) == "completed"
    assert max(intake.figures[p.id].delays_s) == pytest.approx(0.03)
    intake._p99 = (-math.inf, None)  # computed afresh
    assert intake.ticket().guard_s(s.limiter_guard_s, s.limiter_late_s) == pytest.approx(
        s.limiter_late_s + 1.5 * 0.03
    )


def test_a_provider_at_max_concurrency_waits_for_a_place(ports: FakePorts) -> None:
    p = queue(ports, provider_type="deepseek", max_concurrency=1)
    key = concurrency_key(p)
    theirs = ports.limiter.acquire(key, 1, 60.0)  # another worker's request is in flight ...
    assert theirs is not None
    ports.clock.call_later(0.3, lambda: ports.limiter.release(key, theirs))  # ... for 300 ms more
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, answer())
    t0 = ports.clock.now_us

    assert run(ports, mid) == "completed"

    assert ports.limiter.waits == [((key,), 0.3)]  # woken by the release, not by polling
    [call] = ports.providers.calls
    assert us(call.at) == t0 + us(0.3)
    assert ports.limiter.in_flight(key) == 0  # and its own place given back after the call


def test_a_place_is_held_only_on_the_provider_whose_slot_it_waits_for(ports: FakePorts) -> None:
    """Both providers cap what is in flight; the message waits 0.5 s for its slot on `a`, and
    meanwhile holds no place on `b`, which another message could use."""
    a = ports.store.add_provider(name="a", request_limit=2, time_window=1.0, max_concurrency=1)
    b = ports.store.add_provider(name="b", request_limit=1, time_window=60.0, max_concurrency=1)
    ports.store.add_queue(Q, a, b)
    pa, pb = provider_from_row(a), provider_from_row(b)
    ports.limiter.reserve([provider_limits(pa, headroom(ports))], 0)  # a's next slot: in 0.5 s
    ports.limiter.reserve([provider_limits(pb, headroom(ports))], 0)  # b's: in a minute
    seen: list[tuple[int, int]] = []
    ports.clock.call_later(
        0.25,
        lambda: seen.append(
            (ports.limiter.in_flight(concurrency_key(pa)), ports.limiter.in_flight(concurrency_key(pb)))
        ),
    )
    mid = ports.store.add_message(Q)
    ports.providers.script(a["id"], answer())

    assert run(ports, mid) == "completed"

    assert seen == [(1, 0)]
    assert [c.provider_id for c in ports.providers.calls] == [a["id"]]


# -- what the answer says ---------------------------------------------------------------------------


def test_a_token_limit_is_settled_with_the_usage_reported(ports: FakePorts) -> None:
    p = queue(
        ports, provider_type="anthropic", token_limit=10_000, time_window=60.0, config={"max_tokens": 100}
    )
    mid = ports.store.add_message(Q, prompt="How far is the moon?")
    ports.providers.script(p.id, answer(prompt_tokens=20, completion_tokens=30))
    t0 = ports.clock.now_us

    assert run(ports, mid) == "completed"

    used_us = 50 * per_token_us(p, headroom(ports))  # Anthropic counts what was used
    tat = ports.limiter.tat(token_key(p))
    assert tat is not None and abs(tat - (t0 + used_us)) <= 1
    assert ports.limiter.booked[0].keys == (request_limit(p, headroom(ports)).key, token_key(p))


def test_headers_saying_no_requests_are_left_hold_the_provider_until_the_reset(ports: FakePorts) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q)
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}
    ports.providers.script(p.id, answer(headers=headers))

    assert run(ports, mid) == "completed"
    assert ports.limiter.pushes == [((request_limit(p, headroom(ports)).key,), 1.5)]


# -- messages the worker no longer holds, queues it cannot serve ------------------------------------


@pytest.mark.parametrize("outcome", [answer(), ProviderUnavailable("fake: HTTP 500")])
def test_a_message_whose_lease_was_lost_is_left_to_its_new_holder(ports: FakePorts, outcome: Outcome) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, outcome)
    ports.providers.latency_s = 10.0  # the call outlives the 5 s lease ...
    ports.clock.call_later(6.0, lambda: ports.store.claim([mid], 60.0))  # ... and another worker claims it

    assert run(ports, mid, lease_s=5.0) == "lost"

    m = ports.store.messages[mid]
    # the takeover counted the try whose lease ran out; the late outcome wrote nothing
    assert (m.status, m.attempt, m.tries, m.result, m.last_error) == ("processing", 2, 1, None, None)


def test_a_queue_without_an_active_provider_fails_without_a_counted_try(ports: FakePorts) -> None:
    queue(ports, status="quota_exhausted")
    mid = ports.store.add_message(Q)

    assert run(ports, mid) == "failed"

    m = ports.store.messages[mid]
    assert (m.status, m.tries) == ("failed", 0)
    assert m.last_error == "The queue has no usable provider (deleted or out of quota)."
    assert ports.providers.calls == [] and ports.limiter.booked == []


# -- decisions.on_error, pure -----------------------------------------------------------------------


def test_on_error_quota_exhausted_fails_and_stops_the_provider() -> None:
    d = on_error(QuotaExhausted("insufficient_quota"), 0, 5)
    assert (d.retry, d.error, d.quota_exhausted, d.counted, d.hold_provider_s) == (
        False,
        "insufficient_quota",
        True,
        True,
        None,
    )


def test_on_error_rejected_fails_at_once() -> None:
    d = on_error(ProviderRejected("HTTP 400: bad request"), 0, 5)
    assert (d.retry, d.error, d.quota_exhausted, d.avoid_provider) == (
        False,
        "HTTP 400: bad request",
        False,
        False,
    )


def test_on_error_rate_limited_holds_the_provider_and_costs_no_try() -> None:
    d = on_error(RateLimited("HTTP 429", retry_after_s=3.0), 4, 5)  # even on the last try
    assert (d.retry, d.counted, d.hold_provider_s, d.pause_s, d.avoid_provider) == (
        True,
        False,
        3.0,
        0.0,
        False,
    )
    unsaid = on_error(RateLimited("HTTP 429"), 0, 5)
    assert unsaid.hold_provider_s is not None and 0.0 <= unsaid.hold_provider_s <= 1.0


def test_on_error_unavailable_retries_elsewhere_after_the_retry_after_or_a_backoff() -> None:
    d = on_error(ProviderUnavailable("HTTP 503", retry_after_s=7.0), 0, 5)
    assert (d.retry, d.counted, d.pause_s, d.avoid_provider, d.hold_provider_s) == (
        True,
        True,
        7.0,
        True,
        None,
    )
    backoff = on_error(ProviderUnavailable("timed out"), 2, 5)
    assert backoff.retry and 0.0 <= backoff.pause_s <= 2.0  # the third try: up to 0.5 s · 2²


def test_on_error_gives_up_on_the_last_attempt() -> None:
    d = on_error(ProviderUnavailable("HTTP 500"), 4, 5)
    assert (d.retry, d.error, d.counted) == (False, "gave up after 5 attempts: HTTP 500", True)


@pytest.mark.parametrize("exc", [ProviderError("odd answer"), LateForSlot("late")])
def test_on_error_other_provider_errors_are_retried_as_failures(exc: ProviderError) -> None:
    d = on_error(exc, 0, 5)
    assert d.retry and d.counted and d.avoid_provider and 0.0 <= d.pause_s <= 0.5
    assert not on_error(exc, 4, 5).retry


def test_a_paid_answer_is_stored_even_if_the_limiter_fails_right_after(ports: FakePorts) -> None:
    """Redis going away between the answer and its bookkeeping (a place given back, headers
    saying nothing is left) must not throw the answer away and have the provider paid again."""
    p = queue(ports, request_limit=10, time_window=1.0, max_concurrency=2)
    mid = ports.store.add_message(Q)
    ports.providers.script(
        p.id,
        answer("kept", headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}),
    )
    send = ports.providers.call

    def answer_then_redis_goes(*args: object) -> object:
        result = send(*args)  # type: ignore[arg-type]
        ports.limiter.down = True
        return result

    ports.providers.call = answer_then_redis_goes  # type: ignore[method-assign,assignment]

    assert run(ports, mid) == "completed"
    m = ports.store.messages[mid]
    assert (m.status, m.tries) == ("completed", 1)
    assert len(ports.providers.calls) == 1


def test_a_message_leaves_no_reference_cycle_behind(ports: FakePorts) -> None:
    """What a message's way through the worker makes is freed as soon as it is done with, so
    that an invocation with hundreds of requests in flight never needs the collector's full
    passes, which stop every thread at once (requests waiting to leave at their slots too)."""
    p = queue(ports, request_limit=10, time_window=1.0)
    mids = [ports.store.add_message(Q) for _ in range(3)]
    ports.providers.script(
        p.id, RateLimited("fake: HTTP 429", retry_after_s=0.5), *(answer(t) for t in "abc")
    )
    stalls = deque([0.0, 0.05])  # the second request is held up on its way out and retimed
    ports.providers.before_send = lambda _: ports.clock.advance(stalls.popleft() if stalls else 0.0)
    intake = Intake(1.0, 10)
    gc.collect()
    gc.disable()
    try:
        assert [run(ports, mid, ticket=intake.ticket()) for mid in mids] == ["completed"] * 3
        assert intake.figures[p.id].late == 1 and ports.limiter.pushes
        assert gc.collect() == 0
    finally:
        gc.enable()


BLIPS = [
    # (the write that blips, what the provider answers, the outcome, the message's status)
    ("complete", [answer("kept")], "completed", "completed"),
    ("renew", [ProviderUnavailable("fake: HTTP 500"), answer("kept")], "completed", "completed"),
    ("fail", [ProviderRejected("fake: HTTP 400: bad request")], "failed", "failed"),
    ("set_provider_status", [QuotaExhausted("fake: HTTP 429: insufficient_quota")], "failed", "failed"),
    ("release", [], "deferred", "queued"),
]


@pytest.mark.parametrize(("write", "script", "outcome", "status"), BLIPS, ids=[b[0] for b in BLIPS])
def test_each_write_of_a_messages_progress_rides_through_a_postgres_blip(
    ports: FakePorts, write: str, script: list[Outcome], outcome: str, status: str
) -> None:
    """Postgres unreachable for a moment as the message's progress is written (its answer, a
    counted try, its failure, its provider out of quota, its deferral): written once Postgres
    is back, with growing pauses; nothing is lost, its neighbours go on, no call is repeated."""
    p = queue(ports, **({"request_limit": 1, "time_window": 30.0} if write == "release" else {}))
    if write == "release":  # another worker took the only slot: the message is deferred
        ports.limiter.reserve([provider_limits(p, headroom(ports))], 0)
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, *script)
    real = getattr(ports.store, write)
    blips = deque([DependencyUnavailable("postgres: connection reset")] * 3)
    tried = []

    def blipping(*args: object, **kwargs: object) -> object:
        tried.append(args)
        if blips:
            raise blips.popleft()
        return real(*args, **kwargs)

    setattr(ports.store, write, blipping)

    assert run(ports, mid, deadline_s=20.0, call_budget_s=5.0) == outcome
    assert len(tried) == 4 and not blips
    assert ports.store.messages[mid].status == status
    assert len(ports.providers.calls) == len(script)  # not one call more
    if write == "set_provider_status":
        assert ports.store.providers[p.id]["status"] == "quota_exhausted"


def test_a_paid_answer_that_cannot_be_stored_in_time_raises_for_the_event_to_come_again(
    ports: FakePorts,
) -> None:
    p = queue(ports)
    mid = ports.store.add_message(Q)
    ports.providers.script(p.id, answer("lost"))

    def down(*args: object) -> bool:
        raise DependencyUnavailable("postgres: connection refused")

    ports.store.complete = down  # type: ignore[method-assign,assignment]
    t0 = ports.clock.now_us
    with pytest.raises(DependencyUnavailable):
        run(ports, mid)
    assert 25 <= (ports.clock.now_us - t0) / 1e6 <= 30  # STEADY_S, then it gives up
