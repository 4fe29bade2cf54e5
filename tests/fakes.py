"""In-memory implementations of the worker's ports (`ai_rate_limiter.ports`), on a manual clock.

They are real implementations, not mocks (as dramatiq's `rate_limits/backends/stub.py`): the
limiter runs the same GCRA as `reserve.lua`, the store fences writes as the SQL does. So the
worker's decisions run without I/O, and a test asserts on the state they leave behind.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias

from ai_rate_limiter.adapters.egress import Departure, keep_to
from ai_rate_limiter.config import Settings
from ai_rate_limiter.domain.limits import Limit, Reservation
from ai_rate_limiter.domain.models import ChatRequest, ClaimedMessage, Provider, ProviderResult, Usage
from ai_rate_limiter.domain.names import BrokerNames, broker_names
from ai_rate_limiter.errors import LateForSlot, LimiterUnavailable, ProviderError

Row = dict[str, Any]
T = "default"


class FakeClock:
    """Manual time in whole microseconds (as Redis `TIME`): it moves when something sleeps or a
    test advances it. Timers run as time passes them (what another worker does meanwhile), and
    `stall` makes the next sleeps wake up late (a paused process, a busy host)."""

    def __init__(self, start_s: float = 1_000.0) -> None:
        self.now_us = round(start_s * 1_000_000)
        self.slept: list[float] = []  # every sleep asked for, in seconds
        self._stalls: deque[float] = deque()
        self._timers: list[tuple[int, int, Callable[[], object]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self.now_us / 1_000_000

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(seconds, 0.0) + (self._stalls.popleft() if self._stalls else 0.0))

    def stall(self, *extra_s: float) -> None:
        """The next sleeps (one per value) wake up this much later than they asked."""
        self._stalls.extend(extra_s)

    def call_at(self, at: float, action: Callable[[], object]) -> None:
        heapq.heappush(self._timers, (round(at * 1_000_000), next(self._order), action))

    def call_later(self, delay_s: float, action: Callable[[], object]) -> None:
        self.call_at(self.monotonic() + delay_s, action)

    def next_timer(self) -> float | None:
        return self._timers[0][0] / 1_000_000 if self._timers else None

    def advance(self, seconds: float) -> None:
        self.advance_to(self.monotonic() + seconds)

    def advance_to(self, at: float) -> None:
        """Move time to `at` (never back), running the timers it passes, each at its time."""
        target = round(at * 1_000_000)
        while self._timers and self._timers[0][0] <= target:
            when, _, action = heapq.heappop(self._timers)
            self.now_us = max(self.now_us, when)
            action()
        self.now_us = max(self.now_us, target)


@dataclass(frozen=True)
class Booked:
    """A reservation the limiter committed."""

    keys: tuple[str, ...]
    slot_us: int
    wait_s: float


class MemoryLimiter:
    """The shared limiter in memory with the Lua scripts' semantics, key by key and with their
    expiries: `reserve.lua` (candidates, weights, every limit of the chosen one committed or
    none, `max_wait`, adjustments applied first), `push.lua`, `refund.lua` and
    `concurrency.lua`. Its clock is the worker's, so a slot's start is exact: earliest ==
    latest. `down = True` makes every call fail as an unreachable Redis does, and `settle`
    then keeps its adjustments for the next reservation, as `RedisLimiter` does."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.down = False
        self._tat: dict[str, tuple[int, int]] = {}  # key -> (theoretical arrival time, expires at), µs
        self._pending: dict[str, int] = {}
        self._leases: dict[str, tuple[dict[str, int], int]] = {}  # key -> (lease -> ends, expires), ms
        self._wakes: dict[str, tuple[int, int]] = {}  # key -> (wake-ups waiting, expires), ms
        # What was done, for tests to read.
        self.booked: list[Booked] = []
        self.pushes: list[tuple[tuple[str, ...], float]] = []
        self.refunds: list[tuple[tuple[str, ...], int, int]] = []  # keys, slot_us, keys given back
        self.waits: list[tuple[tuple[str, ...], float]] = []  # wait_for_release: keys, seconds waited

    # -- state, as Redis keeps it ---------------------------------------------------------------

    def _now(self) -> int:
        if self.down:
            raise LimiterUnavailable("redis: connection refused (fake)")
        return self.clock.now_us

    def tat(self, key: str) -> int | None:
        """The key's theoretical arrival time (µs on the clock), None once it has expired."""
        return self._get(key, self.clock.now_us)

    def _get(self, key: str, now: int) -> int | None:
        entry = self._tat.get(key)
        if entry is None or now > entry[1]:
            self._tat.pop(key, None)
            return None
        return entry[0]

    def _store(self, key: str, tat: int, now: int) -> None:
        """SET key tat PX ceil((tat - now) / 1000) + 1000, as the scripts do."""
        self._tat[key] = (tat, now + (math.ceil((tat - now) / 1000) + 1000) * 1000)

    # -- reserve.lua ----------------------------------------------------------------------------

    def reserve(
        self, candidates: Sequence[Sequence[Limit]], max_wait_s: float, weights: Sequence[float] = ()
    ) -> Reservation:
        now = self._now()
        adjustments, self._pending = self._pending, {}
        for key, delta_us in adjustments.items():
            tat = self._get(key, now)
            if tat is not None:
                self._store(key, max(tat + delta_us, now), now)
        if not candidates:  # only settling
            return Reservation(-1, 0.0, False, now, now / 1e6, now / 1e6)
        max_wait = int(max_wait_s * 1_000_000)
        best: tuple[float, int, int] | None = None  # score, index, start
        for index, limits in enumerate(candidates):
            weight = round(1000 * (weights[index] if index < len(weights) else 1.0)) / 1000
            start = now
            for lim in limits:
                start = max(start, (self._get(lim.key, now) or 0) - lim.tolerance_us)
            first = limits[0].increment_us if limits else 0
            score = (start - now + first) / weight if weight else math.inf
            if best is None or score < best[0]:
                best = (score, index, start)
        assert best is not None
        _, index, start = best
        wait = start - now
        if wait > max_wait:
            return Reservation(index, wait / 1e6, False, start, start / 1e6, start / 1e6)
        for lim in candidates[index]:
            self._store(lim.key, max(self._get(lim.key, now) or 0, start) + lim.increment_us, now)
        self.booked.append(Booked(tuple(lim.key for lim in candidates[index]), start, wait / 1e6))
        return Reservation(index, wait / 1e6, True, start, start / 1e6, start / 1e6)

    def settle(self, adjustments: dict[str, int]) -> None:
        if not adjustments:
            return
        for key, delta_us in adjustments.items():
            if delta_us:
                self._pending[key] = self._pending.get(key, 0) + int(delta_us)
        with contextlib.suppress(LimiterUnavailable):  # then they go with the next reservation
            self.reserve([], 0)

    # -- push.lua, refund.lua -------------------------------------------------------------------

    def push(self, limits: Sequence[Limit], not_before_s: float) -> int:
        now = self._now()
        not_before = now + int(not_before_s * 1_000_000)
        moved = 0
        for lim in limits:
            if (self._get(lim.key, now) or 0) < not_before:
                self._store(lim.key, not_before, now)
                moved += 1
        self.pushes.append((tuple(lim.key for lim in limits), not_before_s))
        return moved

    def refund(self, limits: Sequence[Limit], slot_us: int) -> int:
        now = self._now()
        refunded = 0
        for lim in limits:
            tat = self._get(lim.key, now)
            if tat is not None and tat == slot_us + lim.increment_us:
                self._store(lim.key, max(slot_us, now), now)
                refunded += 1
        self.refunds.append((tuple(lim.key for lim in limits), slot_us, refunded))
        return refunded

    # -- concurrency.lua ------------------------------------------------------------------------

    def in_flight(self, key: str) -> int:
        """Leases on `key` that have not ended."""
        now_ms = self.clock.now_us // 1000
        leases, expires = self._leases.get(key, ({}, 0))
        return 0 if now_ms > expires else sum(1 for ends in leases.values() if ends > now_ms)

    def acquire(self, key: str, max_in_flight: int, lease_s: float) -> str | None:
        now_ms = self._now() // 1000
        leases, expires = self._leases.get(key, ({}, 0))
        live = {} if now_ms > expires else {lease: ends for lease, ends in leases.items() if ends > now_ms}
        if len(live) >= max_in_flight:
            self._leases[key] = (live, expires)
            return None
        lease, lease_ms = uuid.uuid4().hex, int(lease_s * 1000)
        live[lease] = now_ms + lease_ms
        self._leases[key] = (live, now_ms + lease_ms + 1000)
        return lease

    def release(self, key: str, lease: str) -> None:
        now_ms = self._now() // 1000
        self._leases.get(key, ({}, 0))[0].pop(lease, None)
        waiting, expires = self._wakes.get(key, (0, 0))
        waiting = 0 if now_ms > expires else waiting
        self._wakes[key] = (min(waiting + 1, 100), now_ms + 60_000)

    def wait_for_release(self, keys: Sequence[str], timeout_s: float) -> None:
        """BLPOP on the keys' wake-up lists: returns at once if a release is waiting, else lets
        time pass (running what the clock has scheduled) until one comes or the timeout."""
        started = self._now()
        until = self.clock.monotonic() + max(timeout_s, 0.01)
        while not self._take_wake(keys):
            next_at = self.clock.next_timer()
            if next_at is None or next_at > until:
                self.clock.advance_to(until)
                break
            self.clock.advance_to(next_at)
        self.waits.append((tuple(keys), (self.clock.now_us - started) / 1e6))

    def _take_wake(self, keys: Sequence[str]) -> bool:
        now_ms = self.clock.now_us // 1000
        for key in keys:
            waiting, expires = self._wakes.get(key, (0, 0))
            if waiting and now_ms <= expires:
                self._wakes[key] = (waiting - 1, expires)
                return True
        return False


@dataclass
class StoredMessage:
    id: str
    tenant_id: str
    queue_id: str
    batch_id: str | None
    request: ChatRequest
    status: str = "queued"
    attempt: int = 0  # fences every write: bumped by each claim and renewal
    tries: int = 0  # provider calls counted against the message
    lease_until: float | None = None
    last_error: str | None = None
    provider_id: str | None = None
    provider_name: str | None = None
    result: ProviderResult | None = None
    unpublished: bool = False  # released and its delayed copy not confirmed yet: the relay's
    dead_lettered: bool = False
    claim_token: str | None = None


class MemoryStore:
    """Messages and providers with the SQL's semantics: `claim` takes queued messages and those
    whose lease ran out (bumping `attempt`); `renew`, `complete`, `fail` and `release` change a
    message only while it is `processing` under the claimer's `attempt`."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.messages: dict[str, StoredMessage] = {}
        self.providers: dict[str, Row] = {}
        self.queues: dict[tuple[str, str], list[tuple[str, float]]] = {}
        self._versions = itertools.count(1)

    # -- set-up, as the API would write it ------------------------------------------------------

    def add_provider(self, **fields: Any) -> Row:
        row: Row = {
            "id": str(uuid.uuid4()),
            "name": "fake",
            "provider_type": "openai",
            "api_key": f"sk-test-{uuid.uuid4().hex}",
            "request_limit": 1000,
            "time_window": 1.0,
            "token_limit": None,
            "max_concurrency": None,
            "config": {"endpoint": "http://fake.invalid"},
            "status": "active",
            "status_detail": None,
            "updated_at": next(self._versions),
            **fields,
        }
        self.providers[row["id"]] = row
        return row

    def add_queue(
        self, queue_id: str, *providers: Row, weights: Sequence[float] = (), tenant: str = T
    ) -> None:
        self.queues[(tenant, queue_id)] = [
            (p["id"], weights[i] if i < len(weights) else 1.0) for i, p in enumerate(providers)
        ]

    def add_message(
        self, queue_id: str, prompt: str = "Hello", tenant: str = T, tries: int = 0, **request: Any
    ) -> str:
        mid = str(uuid.uuid4())
        req = ChatRequest(messages=[{"role": "user", "content": prompt}], **request)
        self.messages[mid] = StoredMessage(mid, tenant, queue_id, None, req, tries=tries)
        return mid

    # -- MessageStore ---------------------------------------------------------------------------

    def queue_providers(self, tenant: str, queue_id: str) -> list[tuple[Row, float]]:
        return [(dict(self.providers[pid]), w) for pid, w in self.queues.get((tenant, queue_id), [])]

    def set_provider_status(
        self, provider_id: str, status: str, detail: str | None, version: str | None = None
    ) -> bool:
        row = self.providers.get(provider_id)
        if row is None or (version is not None and str(row["updated_at"]) != version):
            return False
        row.update(status=status, status_detail=detail)
        return True

    def claim(self, ids: Sequence[str], lease_s: float, token: str | None = None) -> list[ClaimedMessage]:
        now, claimed, token = self.clock.monotonic(), [], token or str(uuid.uuid4())
        for mid in dict.fromkeys(ids):
            m = self.messages.get(mid)
            if m is None:
                continue
            if m.status == "processing" and m.claim_token == token:  # this claim, tried again
                m.lease_until = now + lease_s
            elif m.status == "queued" or (
                m.status == "processing" and m.lease_until is not None and m.lease_until < now
            ):
                m.tries += m.status == "processing"  # a lease that ran out is a try spent
                m.status, m.attempt, m.lease_until = "processing", m.attempt + 1, now + lease_s
                m.claim_token = token
            else:
                continue
            claimed.append(
                ClaimedMessage(
                    m.id, m.tenant_id, m.queue_id, m.batch_id, m.request, m.attempt, m.tries, m.last_error
                )
            )
        return claimed

    def held_elsewhere(self, ids: Sequence[str]) -> list[Row]:
        now = self.clock.monotonic()
        return [
            {
                "id": mid,
                "tenant_id": m.tenant_id,
                "queue_id": m.queue_id,
                "lease_left_s": max((m.lease_until or now) - now, 0.0),
            }
            for mid in dict.fromkeys(ids)
            if (m := self.messages.get(mid)) is not None and m.status == "processing"
        ]

    def _held(self, msg: ClaimedMessage) -> StoredMessage | None:
        m = self.messages.get(msg.id)
        return m if m is not None and m.status == "processing" and m.attempt == msg.attempt else None

    def renew(self, msg: ClaimedMessage, lease_s: float, counted: bool, error: str) -> ClaimedMessage | None:
        m = self._held(msg)
        if m is None:
            return None
        m.attempt += 1
        m.tries += int(counted)
        m.lease_until = self.clock.monotonic() + lease_s
        m.last_error = error[:4000]
        return replace(msg, attempt=m.attempt, tries=m.tries)

    def complete(self, msg: ClaimedMessage, provider: Provider, result: ProviderResult) -> bool:
        m = self._held(msg)
        if m is None:
            return False
        m.status, m.lease_until, m.tries, m.last_error = "completed", None, m.tries + 1, None
        m.provider_id, m.provider_name, m.result = provider.id, provider.name, result
        return True

    def fail(
        self,
        msg: ClaimedMessage,
        error: str,
        provider: Provider | None,
        counted: bool = True,
        dead_letter: bool = False,
    ) -> bool:
        m = self._held(msg)
        if m is None:
            return False
        m.status, m.lease_until, m.last_error = "failed", None, error[:4000]
        m.dead_lettered = dead_letter
        m.tries += int(counted)
        if provider is not None:
            m.provider_id, m.provider_name = provider.id, provider.name
        return True

    def release(self, msg: ClaimedMessage, note: str | None = None) -> bool:
        m = self._held(msg)
        again = self.messages.get(msg.id)
        if m is None and again is not None and again.attempt == msg.attempt and again.status == "queued":
            m = again if again.unpublished else None  # released already, its copy still to come
        if m is None:
            return False
        m.status, m.lease_until, m.unpublished = "queued", None, True
        m.last_error = note if note is not None else m.last_error
        return True

    def published(self, ids: Sequence[str]) -> None:
        for mid in ids:
            self.messages[mid].unpublished = False


@dataclass(frozen=True)
class Call:
    """One call the worker made: when (on the fake clock), and whether the request left."""

    provider_id: str
    at: float
    sent: bool
    request: ChatRequest


Outcome: TypeAlias = ProviderResult | ProviderError


def answer(
    text: str = "ok",
    prompt_tokens: int = 10,
    completion_tokens: int = 5,
    headers: dict[str, str] | None = None,
) -> ProviderResult:
    usage = Usage(prompt_tokens, completion_tokens)
    return ProviderResult(text, usage, {"text": text}, 1, "fake-model", dict(headers or {}))


class ScriptedProviders:
    """Each provider answers with its script, in order: a `ProviderResult` returned, or an error
    of `errors.py` raised. A request keeps to its `Departure` as the transport does: if the
    clock is past `leave_by` when it would leave, it is not sent and `on_late`'s error is raised
    (`before_send` runs first: a hook where a test lets time pass); otherwise `sent_at` is set,
    writing it takes `write_s` (then `written_at` is set), and the answer `latency_s`."""

    def __init__(self, clock: FakeClock, latency_s: float = 0.0) -> None:
        self.clock = clock
        self.latency_s = latency_s
        self.write_s = 0.0
        self.scripts: dict[str, deque[Outcome]] = {}
        self.calls: list[Call] = []
        self.before_send: Callable[[Provider], None] | None = None

    def script(self, provider_id: str, *outcomes: Outcome) -> None:
        self.scripts.setdefault(provider_id, deque()).extend(outcomes)

    def sent(self, provider_id: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.sent and provider_id in (None, c.provider_id)]

    def call(self, p: Provider, req: ChatRequest, departure: Departure | None = None) -> ProviderResult:
        if self.before_send is not None:
            self.before_send(p)
        now = self.clock.monotonic()
        if departure is not None:
            try:
                now = keep_to(departure, self.clock.monotonic)  # as the egress stream does
            except LateForSlot:
                self.calls.append(Call(p.id, self.clock.monotonic(), False, req))
                raise
            departure.sent_at = now
            self.clock.advance(self.write_s)
            departure.written_at = self.clock.monotonic()
        self.calls.append(Call(p.id, now, True, req))
        script = self.scripts.get(p.id)
        if not script:
            raise AssertionError(f"provider {p.name} ({p.id}) was called with nothing scripted")
        outcome = script.popleft()
        self.clock.advance(self.latency_s)
        if isinstance(outcome, ProviderError):
            try:
                raise outcome
            finally:
                del outcome  # as an SDK's own raise leaves nothing behind: no frame-error cycle
        return outcome


@dataclass
class MemoryBroker:
    """Records what is parked in a queue's delay queue (names, body, delay_s) and what is put
    in its dead-letter queue (names, body, why)."""

    delayed: list[tuple[BrokerNames, bytes, float]] = field(default_factory=list)
    dead: list[tuple[BrokerNames, bytes, str]] = field(default_factory=list)  # dead-letter copies

    def publish_delayed(self, names: BrokerNames, body: bytes, delay_s: float) -> None:
        self.delayed.append((names, body, delay_s))

    def publish_dead(self, names: BrokerNames, copies: Sequence[tuple[bytes, str]]) -> None:
        self.dead += [(names, body, why) for body, why in copies]


@dataclass
class FakePorts:
    """`WorkerPorts` in memory, all on one FakeClock."""

    settings: Settings
    clock: FakeClock
    store: MemoryStore
    limiter: MemoryLimiter
    providers: ScriptedProviders
    broker: MemoryBroker

    @classmethod
    def build(cls, **settings: Any) -> FakePorts:
        clock = FakeClock()
        return cls(
            replace(Settings(), **settings),
            clock,
            MemoryStore(clock),
            MemoryLimiter(clock),
            ScriptedProviders(clock),
            MemoryBroker(),
        )

    def names(self, tenant_id: str, queue_id: str) -> BrokerNames:
        return broker_names(self.settings.broker_prefix, tenant_id, queue_id)
