"""When an invocation takes its next message: once its queue's schedule is close.

A message is taken from the broker only when the latest slot this invocation has reserved
starts within `lookahead_s`, so on a slow limit the backlog waits in the broker (where it costs
nothing) instead of being claimed, parked and published again; and on a fast one enough
messages hold slots ahead that the schedule never waits for the next claim.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..domain.limits import guard_s

MAX_UNSLOTTED = 64  # messages taken that have not reserved their first slot yet
SAMPLES = 2048  # recent measurements kept per provider
GUARD_SAMPLES = 1000  # recent write times the guard is sized from
GUARD_MIN_SAMPLES = 50
GUARD_EVERY_S = 0.5


@dataclass
class ProviderFigures:
    """What one invocation measured of one provider since its figures were last taken."""

    sent: int = 0
    rate_limited: int = 0
    late: int = 0  # requests held back because they would have left too late
    delays_s: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))  # slot to departure
    waits_s: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))  # asking to slot


class Intake:
    def __init__(self, lookahead_s: float, max_in_flight: int, max_unslotted: int = MAX_UNSLOTTED) -> None:
        self.lookahead_s = lookahead_s
        self.max_in_flight = max_in_flight
        self.max_unslotted = max_unslotted
        self.in_flight = 0
        self.unslotted = 0
        self.horizon = -math.inf  # the latest slot reserved, on the monotonic clock
        self.gap = 0.0  # how far the last slot that moved the horizon moved it
        self.slots = 0
        self.completed = 0
        self.figures: dict[str, ProviderFigures] = {}
        self.writes: deque[float] = deque(maxlen=GUARD_SAMPLES)  # from the departure check to written
        self._p99: tuple[float, float | None] = (-math.inf, None)  # (when, value)
        self._cond = threading.Condition()

    def room_in(self, now: float | None = None, taking: int = 0) -> float:
        """Seconds until another message may be taken (besides `taking` about to be): 0 now;
        inf until one finishes or reserves its slot. Fewer may wait for their first slot the
        further apart the slots are: one, once they are `lookahead_s` apart."""
        now = time.monotonic() if now is None else now
        with self._cond:
            if self._places(taking) <= 0:
                return math.inf
            return max(0.0, self.horizon - self.lookahead_s - now)

    def wanted(self, most: int, taking: int = 0) -> int:
        """How many more may be taken now besides `taking` (at most `most`)."""
        now = time.monotonic()
        with self._cond:
            if self.horizon - self.lookahead_s - now > 0:
                return 0
            return max(0, min(most, self._places(taking)))

    def _places(self, taking: int) -> int:
        """How many more could start besides `taking`, by the caps on messages in flight and on
        those waiting for their first slot (under the lock)."""
        # Until two slots tell how far apart they are, one at a time.
        spread = self.lookahead_s / self.gap if self.gap > 0 else (math.inf if self.slots >= 2 else 1)
        in_flight = self.max_in_flight - self.in_flight - taking
        unslotted = math.ceil(min(self.max_unslotted, spread) - self.unslotted - taking)
        return min(in_flight, unslotted)

    def next_slot_after(self, at: float) -> bool:
        """Whether the next slot may start after `at`: the latest one plus the last gap."""
        with self._cond:
            return self.horizon + self.gap >= at

    def write_p99(self) -> float | None:
        """The p99 of recent write times (None until there are enough)."""
        now = time.monotonic()
        with self._cond:
            when, value = self._p99
            if now - when < GUARD_EVERY_S:
                return value
            writes = sorted(self.writes)
            value = writes[int(0.99 * len(writes))] if len(writes) >= GUARD_MIN_SAMPLES else None
            self._p99 = (now, value)
            return value

    def wait(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, waking early when a message reserves its slot or finishes."""
        with self._cond:
            self._cond.wait(max(timeout_s, 0.0))

    def ticket(self) -> Ticket:
        with self._cond:
            self.in_flight += 1
            self.unslotted += 1
        return Ticket(self)

    def take_figures(self) -> tuple[int, dict[str, ProviderFigures]]:
        """Completions and provider figures since the last call."""
        with self._cond:
            done, figures = self.completed, self.figures
            self.completed, self.figures = 0, {}
        return done, figures

    def _figures(self, provider_id: str) -> ProviderFigures:
        figures = self.figures.get(provider_id)
        if figures is None:
            figures = self.figures[provider_id] = ProviderFigures()
        return figures


class Ticket:
    """One message's place in the intake, and what it measures on its way."""

    def __init__(self, intake: Intake | None) -> None:
        self.intake = intake
        self.slotted = False
        self.finished = False

    @classmethod
    def untracked(cls) -> Ticket:
        return cls(None)

    def slot(self, at: float, waited_s: float, provider_id: str) -> None:
        """The message holds a slot starting at `at` (monotonic), after asking for `waited_s`."""
        intake = self.intake
        if intake is None:
            return
        with intake._cond:
            if not self.slotted:
                self.slotted = True
                intake.unslotted -= 1
            intake.slots += 1
            if at > intake.horizon:
                if intake.horizon > -math.inf:
                    intake.gap = at - intake.horizon
                intake.horizon = at
            intake._figures(provider_id).waits_s.append(waited_s)
            intake._cond.notify_all()

    def no_slot_until(self, at: float) -> None:
        """No slot fitted in the invocation's time: the queue's schedule reaches `at` (a slot
        given up by a late request moves it, unseen). Nothing more is taken before it is near."""
        intake = self.intake
        if intake is not None:
            with intake._cond:
                intake.horizon = max(intake.horizon, at)

    def departed(self, provider_id: str, delay_s: float, write_s: float) -> None:
        """The request left `delay_s` after its slot; its write took `write_s` from the check."""
        if self.intake is not None:
            with self.intake._cond:
                figures = self.intake._figures(provider_id)
                figures.sent += 1
                figures.delays_s.append(delay_s)
                self.intake.writes.append(write_s)

    def guard_s(self, floor_s: float, late_s: float) -> float:
        """The guard to pace this message's providers with (see `limits.guard_s`)."""
        return guard_s(floor_s, late_s, self.intake.write_p99() if self.intake else None)

    def held_back(self, provider_id: str) -> None:
        """A request that would have left too long after its slot was not sent: it cannot
        arrive late, so the guard does not grow with it (what the machine's load does to the
        requests that are sent shows in their write times)."""
        if self.intake is not None:
            with self.intake._cond:
                self.intake._figures(provider_id).late += 1

    def rate_limited(self, provider_id: str) -> None:
        if self.intake is not None:
            with self.intake._cond:
                self.intake._figures(provider_id).rate_limited += 1

    def done(self, completed: bool) -> None:
        intake = self.intake
        if intake is None or self.finished:
            return
        self.finished = True
        with intake._cond:
            intake.in_flight -= 1
            if not self.slotted:
                intake.unslotted -= 1
            intake.completed += int(completed)
            intake._cond.notify_all()
