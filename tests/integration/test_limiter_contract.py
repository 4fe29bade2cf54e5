"""One contract for every limiter backend: the real `RedisLimiter` (the Lua scripts, on Redis's
clock) and `tests.fakes.MemoryLimiter` (on a FakeClock), so the fake the unit tests run on
behaves as the real one does.

Time passes on its own for Redis: a wait is compared with a tolerance there and exactly in
memory. Slots' starts (`slot_us`, on the limiter's own clock) follow from each other and are
compared exactly on both.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.domain.limits import Limit
from ai_rate_limiter.ports import Limiter

from tests.fakes import FakeClock, MemoryLimiter


@dataclass
class Backend:
    limiter: Limiter
    tolerance_s: float  # how far a wait may be from the schedule (time passes between calls)
    elapse: Callable[[float], None]  # let this much time pass
    now: Callable[[], float]  # this process's clock, on which Reservation.earliest/latest lie

    def near(self, wait_s: float, expected_s: float) -> bool:
        return abs(wait_s - expected_s) <= self.tolerance_s + 1e-9


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        c: Container = request.getfixturevalue("container")  # a flushed Redis test database
        return Backend(c.limiter, 0.025, time.sleep, time.monotonic)
    clock = FakeClock()
    return Backend(MemoryLimiter(clock), 0.0, clock.advance, clock.monotonic)


def limit(interval_ms: float, tolerance_ms: float = 0) -> Limit:
    return Limit(f"test:{uuid.uuid4().hex}", round(interval_ms * 1000), round(tolerance_ms * 1000))


def test_strict_pacing_puts_slots_one_increment_apart(backend: Backend) -> None:
    lim, one = backend.limiter, limit(100)
    got = [lim.reserve([[one]], 10) for _ in range(5)]
    assert all(r.reserved and r.index == 0 for r in got)
    assert [r.slot_us - got[0].slot_us for r in got] == [i * one.increment_us for i in range(5)]
    assert all(backend.near(r.wait_s, 0.1 * i) for i, r in enumerate(got)), [r.wait_s for r in got]


def test_the_slot_is_placed_on_this_processs_clock(backend: Backend) -> None:
    lim, one = backend.limiter, limit(200)
    lim.reserve([[one]], 10)
    asked = backend.now()
    r = lim.reserve([[one]], 10)
    assert r.earliest <= r.latest <= r.earliest + backend.tolerance_s
    assert backend.near(r.earliest - asked, r.wait_s) and backend.near(r.wait_s, 0.2)


def test_tolerance_lets_a_burst_start_early(backend: Backend) -> None:
    lim, bursty = backend.limiter, limit(100, tolerance_ms=200)
    waits = [lim.reserve([[bursty]], 10).wait_s for _ in range(4)]
    assert all(backend.near(w, 0.0) for w in waits[:3]) and backend.near(waits[3], 0.1)


def test_a_slot_beyond_max_wait_is_refused_and_commits_nothing(backend: Backend) -> None:
    lim, a, b = backend.limiter, limit(500), limit(100)
    first = lim.reserve([[a, b]], 0)
    refused = lim.reserve([[a, b]], 0.1)
    assert first.reserved and not refused.reserved
    assert refused.slot_us == first.slot_us + a.increment_us and backend.near(refused.wait_s, 0.5)
    # Neither limit moved: `b` alone is free one increment after its first slot, and the
    # pair's next slot is still the one that was refused.
    assert lim.reserve([[b]], 10).slot_us == first.slot_us + b.increment_us
    assert lim.reserve([[a, b]], 10).slot_us == refused.slot_us


def test_a_peek_with_negative_max_wait_says_when_without_reserving(backend: Backend) -> None:
    lim, one = backend.limiter, limit(300)
    lim.reserve([[one]], 10)
    peek = lim.reserve([[one]], -1.0)
    assert not peek.reserved and backend.near(peek.wait_s, 0.3)
    assert lim.reserve([[one]], 10).slot_us == peek.slot_us


def test_of_two_candidates_the_soonest_wins(backend: Backend) -> None:
    lim, slow, fast = backend.limiter, limit(1000), limit(10)
    picks = [lim.reserve([[slow], [fast]], 10).index for _ in range(20)]
    assert picks[0] == 1 and picks.count(1) >= 18  # more capacity: fast serves sooner
    busy, free = limit(10), limit(10)
    lim.push([busy], 0.5)
    assert lim.reserve([[busy], [free]], 10).index == 1  # a held provider loses to a free one


def test_free_candidates_share_work_by_capacity_and_weight(backend: Backend) -> None:
    lim = backend.limiter
    fast, slow = limit(10), limit(30)  # 100/s and ~33/s
    picks = [lim.reserve([[fast], [slow]], 10).index for _ in range(40)]
    assert 27 <= picks.count(0) <= 33  # about 3:1, as their rates
    a, b = limit(10), limit(10)
    weighted = [lim.reserve([[a], [b]], 10, weights=[3.0, 1.0]).index for _ in range(40)]
    assert 27 <= weighted.count(0) <= 33  # equal rates, weights 3:1


def test_all_limits_of_a_candidate_are_committed_together(backend: Backend) -> None:
    lim, a, b = backend.limiter, limit(100), limit(300)
    first = lim.reserve([[a, b]], 10)
    second = lim.reserve([[a, b]], 10)
    assert second.slot_us == first.slot_us + b.increment_us  # the slower limit sets the pace
    assert backend.near(first.wait_s, 0.0) and backend.near(second.wait_s, 0.3)
    # Both moved with each slot: `a` next starts after the second slot's own increment.
    assert lim.reserve([[a]], 10).slot_us == second.slot_us + a.increment_us


def test_settle_moves_a_schedule_and_skips_keys_it_does_not_hold(backend: Backend) -> None:
    lim, tokens = backend.limiter, limit(100)
    first = lim.reserve([[tokens]], 10)
    lim.settle({tokens.key: -50_000, f"test:{uuid.uuid4().hex}": 10_000})  # used less than estimated
    second = lim.reserve([[tokens]], 10)
    assert second.slot_us == first.slot_us + 50_000
    lim.settle({tokens.key: 200_000})  # used more
    third = lim.reserve([[tokens]], 10)
    assert third.slot_us == second.slot_us + 100_000 + 200_000
    lim.settle({})  # nothing to settle: nothing happens


def test_settle_never_moves_a_schedule_into_the_past(backend: Backend) -> None:
    lim, tokens = backend.limiter, limit(100)
    lim.reserve([[tokens]], 10)
    lim.settle({tokens.key: -10_000_000})  # ten seconds back: only to now
    backend.elapse(0.01)
    after = lim.reserve([[tokens]], 10)
    assert backend.near(after.wait_s, 0.0)
    assert backend.near(lim.reserve([[tokens]], 10).wait_s, 0.1)  # no credit banked


def test_push_holds_every_slot_until_then(backend: Backend) -> None:
    lim, a, b = backend.limiter, limit(10), limit(10)
    assert lim.push([a, b], 0.5) == 2
    assert lim.push([a], 0.1) == 0  # already held longer: not moved back
    held = lim.reserve([[a]], 10)
    assert backend.near(held.wait_s, 0.5)
    assert lim.reserve([[b]], 10).slot_us == held.slot_us  # both were held to the same time


def test_refund_gives_back_only_the_last_slot(backend: Backend) -> None:
    lim, one = backend.limiter, limit(100)
    first = lim.reserve([[one]], 10)
    second = lim.reserve([[one]], 10)
    assert lim.refund([one], first.slot_us) == 0  # a later slot was taken: it stays used
    assert lim.refund([one], second.slot_us) == 1
    assert lim.reserve([[one]], 10).slot_us == second.slot_us  # the next taker gets it


def test_refund_of_a_slot_in_the_past_gives_back_only_from_now(backend: Backend) -> None:
    lim, one = backend.limiter, limit(100)
    taken = lim.reserve([[one]], 10)
    backend.elapse(0.05)
    assert lim.refund([one], taken.slot_us) == 1
    again = lim.reserve([[one]], 10)
    assert again.slot_us >= taken.slot_us + 50_000 and backend.near(again.wait_s, 0.0)
    assert backend.near(lim.reserve([[one]], 10).wait_s, 0.1)


def test_concurrency_leases_cap_and_release(backend: Backend) -> None:
    lim, key = backend.limiter, f"test:{uuid.uuid4().hex}:conc"
    first, second = lim.acquire(key, 2, 10), lim.acquire(key, 2, 10)
    assert first and second and first != second
    assert lim.acquire(key, 2, 10) is None  # full
    lim.release(key, first)
    assert lim.acquire(key, 2, 10) is not None  # its place is free again
    assert lim.acquire(key, 2, 10) is None


def test_a_lease_ends_on_its_own_when_its_holder_is_gone(backend: Backend) -> None:
    lim, key = backend.limiter, f"test:{uuid.uuid4().hex}:conc"
    assert lim.acquire(key, 1, 0.2)
    assert lim.acquire(key, 1, 0.2) is None
    backend.elapse(0.3)
    assert lim.acquire(key, 1, 0.2) is not None


def test_waiting_for_a_place_ends_at_a_release_or_the_timeout(backend: Backend) -> None:
    lim, key = backend.limiter, f"test:{uuid.uuid4().hex}:conc"
    lease = lim.acquire(key, 1, 10)
    assert lease
    started = backend.now()
    lim.wait_for_release([key], 0.2)  # nobody releases: the whole timeout
    assert backend.now() - started >= 0.2 - 0.02
    lim.release(key, lease)
    started = backend.now()
    lim.wait_for_release([f"test:{uuid.uuid4().hex}:conc", key], 5)  # a release is waiting: at once
    assert backend.now() - started < 0.5
