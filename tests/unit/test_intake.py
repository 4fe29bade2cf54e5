"""When an invocation takes its next message, and what it measures for the guard."""

from __future__ import annotations

import math
import time

import pytest
from ai_rate_limiter.services.intake import GUARD_MIN_SAMPLES, Intake


def test_one_message_waits_for_a_first_slot_until_two_slots_tell_the_spacing() -> None:
    intake = Intake(lookahead_s=1.0, max_in_flight=100)
    assert intake.room_in(now=0.0) == 0
    first = intake.ticket()
    assert intake.room_in(now=0.0) == math.inf  # one waits for its slot: no second yet
    first.slot(at=0.0, waited_s=0.0, provider_id="p")
    second = intake.ticket()
    second.slot(at=0.025, waited_s=0.025, provider_id="p")  # 40 a second
    assert intake.room_in(now=0.0, taking=30) == 0  # 1 s of slots at that spacing may wait
    assert intake.room_in(now=0.0, taking=40) == math.inf


def test_slots_far_apart_let_the_backlog_wait_in_the_broker() -> None:
    intake = Intake(lookahead_s=1.0, max_in_flight=100)
    for at in (0.0, 3.6):  # 1,000 an hour
        t = intake.ticket()
        t.slot(at=at, waited_s=at, provider_id="p")
    assert intake.room_in(now=0.0) == pytest.approx(2.6)  # not before the last slot is 1 s away
    assert intake.next_slot_after(5.0)  # the next one may start after 5 s: near the end, ask first


def test_the_guard_grows_with_write_times_and_not_with_requests_held_back() -> None:
    """A request held back never left, so it cannot arrive late; one that was sent may have
    reached the wire anywhere between its departure check and the end of its write."""
    intake = Intake(lookahead_s=1.0, max_in_flight=100)
    ticket = intake.ticket()
    assert ticket.guard_s(0.03, 0.02) == 0.03  # nothing measured: the floor
    for _ in range(GUARD_MIN_SAMPLES):
        ticket.held_back("p")
    intake._p99 = (-math.inf, None)  # computed afresh
    assert ticket.guard_s(0.03, 0.02) == 0.03
    for _ in range(GUARD_MIN_SAMPLES):
        ticket.departed("p", delay_s=0.019, write_s=0.04)  # left on time, then a slow write
    intake._p99 = (-math.inf, None)
    assert ticket.guard_s(0.03, 0.02) == pytest.approx(0.02 + 1.5 * 0.04)
    assert (intake.figures["p"].late, intake.figures["p"].sent) == (GUARD_MIN_SAMPLES, GUARD_MIN_SAMPLES)


def test_a_message_deferred_for_want_of_a_slot_stops_the_taking_until_the_schedule_is_near() -> None:
    """A slot given up by a late request moves the limiter's schedule where the intake cannot
    see it; the deferral says where it is, so the next messages are not taken only to be
    deferred in turn."""
    intake = Intake(lookahead_s=1.0, max_in_flight=100)
    for at in (0.0, 2.0):  # 1 every 2 s
        t = intake.ticket()
        t.slot(at=at, waited_s=at, provider_id="p")
        t.done(True)
    assert intake.room_in(now=2.0) == 0
    deferred = intake.ticket()
    deferred.no_slot_until(6.0)  # the next slot is 4 s away, past the invocation's time
    deferred.done(False)
    assert intake.room_in(now=2.0) == pytest.approx(3.0)
    assert intake.room_in(now=5.0) == 0


@pytest.mark.parametrize("gap", [0.0, 0.003, 0.02, 0.3, 0.7, 1.5])
@pytest.mark.parametrize("in_flight", [0, 5, 99])
def test_wanted_is_how_many_would_each_find_room(gap: float, in_flight: int) -> None:
    """`wanted(most)` in one step is the count of messages, one after another, that `room_in`
    would let in at once."""
    intake = Intake(lookahead_s=1.0, max_in_flight=100, max_unslotted=64)
    for at in (0.0, gap):  # two slots: the spacing the intake goes by
        t = intake.ticket()
        t.slot(at=at, waited_s=0.0, provider_id="p")
        t.done(True)
    intake.gap = gap
    tickets = [intake.ticket() for _ in range(in_flight)]
    for unslotted_taken in (0, 3):
        for most in (0, 1, 7, 50, 200):
            one_by_one = 0
            while one_by_one < most and intake.room_in(taking=unslotted_taken + one_by_one) == 0:
                one_by_one += 1
            assert intake.wanted(most, taking=unslotted_taken) == one_by_one
    for t in tickets:
        t.done(False)
    intake.horizon = time.monotonic() + 5.0  # the schedule is far ahead: nothing now
    assert intake.wanted(50) == 0
