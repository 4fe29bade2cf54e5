"""One worker invocation: its event's messages, then its queue's, for as long as it has time.

An Amazon MQ event source mapping runs one invocation at a time, and an event ends when its
slowest call returns. So the event only starts the work: the invocation goes on taking its
queue's messages itself (its own shard first, then the queue's other shards) whenever the
queue's schedule is close (`Intake`), acks each once its outcome is stored, and stops taking
new ones shortly before its deadline, or once it has had nothing to do for `WORKER_IDLE_S`.
Then it waits for the calls still out and returns. The event's own messages are acked by the
event source when it returns (whole-batch retry: if a dependency is down it raises, and the
event comes again; the messages it took itself go back to the broker unacked).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait
from typing import Any, TypeVar

from ..adapters.postgres import provider_from_row
from ..adapters.rabbitmq import QueueReader
from ..bootstrap import Container
from ..domain.decisions import gave_up
from ..domain.limits import Headroom, provider_limits
from ..domain.models import ClaimedMessage, Provider
from ..domain.names import at_most, parse_shard
from ..domain.rmq_event import Delivery, parse_event
from ..errors import DependencyUnavailable, LimiterUnavailable, NotFound
from . import dispatch, monitoring
from .intake import Intake
from .processing import (
    LEASE_S,
    SAFETY_S,
    SHUTTING_DOWN,
    Deadline,
    Steady,
    process,
    quietly,
    through_blips,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
PUMP_S = 0.05  # the longest the reading thread leaves the broker connection and acks waiting
MAX_TAKE = 50  # messages claimed in one query
# A message is leased for LEASE_S, and the invocation working on it extends that every
# LEASE_RENEW_S while it runs: one that dies (or loses Postgres) leaves its messages to the
# next claim within LEASE_S, not when its whole time would have run out.
LEASE_RENEW_S = 5.0
# While Postgres is unreachable a claim (and the invocation's other reads and writes) is tried
# again, with growing pauses, for this long: an event failed at once would be delivered again
# at once, each time counted towards the broker's delivery limit, and its messages still
# leased would wait for their leases to end.
CLAIM_RETRY_S = 20.0


def message_ids(deliveries: Sequence[Delivery]) -> tuple[list[str], int]:
    """Message ids in delivery order, and how many bodies were malformed (logged and acked)."""
    ids, malformed = [], 0
    for d in deliveries:
        mid = dispatch.message_id_of(d.data)
        if mid is None:
            log.warning("skipping a malformed message on %s (%d bytes)", d.queue, len(d.data))
            malformed += 1
        else:
            ids.append(mid)
    return list(dict.fromkeys(ids)), malformed


def handle_event(c: Container, event: Mapping[str, Any], remaining_s: float) -> dict[str, int]:
    deliveries = parse_event(event)
    ids, malformed = message_ids(deliveries)
    run = Invocation(c, Deadline.after(remaining_s))
    run.outcomes["malformed"] += malformed
    try:
        run.take(ids)
        for name in dict.fromkeys(d.queue for d in deliveries):
            run.consume(name)
    finally:
        run.drain()
    return run.result()


class Invocation:
    def __init__(self, c: Container, deadline: Deadline) -> None:
        s = c.settings
        self.c, self.deadline = c, deadline
        self.call_budget = min(s.provider_timeout_s, max(deadline.remaining(), 0.0) / 3)
        self.stop_at = deadline.at - self.call_budget - SAFETY_S  # no new work after this
        self.intake = Intake(s.worker_lookahead_s, s.worker_concurrency)
        self.outcomes: Counter[str] = Counter()
        self.errors: list[BaseException] = []
        self.finished: queue.SimpleQueue[int] = queue.SimpleQueue()  # delivery tags to ack
        self.futures: list[Future[None]] = []
        self.providers: dict[tuple[str, str], list[Provider]] = {}
        self.batches: set[str] = set()  # touched since they were last looked at
        self.lock = threading.Lock()
        self.started = time.time()
        self.held: set[str] = set()  # messages being worked on: their leases are extended
        self.leases_at = time.monotonic()

    def take(self, ids: Sequence[str], tags: Mapping[str, int] | None = None) -> None:
        """Claim these messages and start each; those already done (a redelivery) are acked,
        and one another worker still leases comes back when that lease ends."""
        if not ids:
            return
        token = str(uuid.uuid4())  # the same for each try: one whose reply was lost took them already
        claimed = self.steadily("claiming messages", lambda: self.c.store.claim(ids, LEASE_S, token))
        got = {m.id for m in claimed}
        spent = [m for m in claimed if m.tries >= self.c.settings.max_attempts]
        claimed = [m for m in claimed if m.tries < self.c.settings.max_attempts]
        for i, m in enumerate(claimed):  # started first: whatever fails below, a claimed message is under way
            try:
                self.start(m, None if tags is None else tags[m.id])
            except BaseException:
                # Its providers could not be loaded (a key that cannot be opened, Postgres
                # gone): what was not started goes back at once rather than when its lease ends.
                for left in claimed[i:] + spent:
                    quietly(self.c.store.release, left, None)
                raise
        for m in spent:  # its leases ended without an outcome until no try was left
            self.dead_letter(m, tags)
        if len(got) < len(ids):
            parked = self.steadily("parking held messages", lambda: park_held(self.c, set(ids) - got))
            with self.lock:
                self.outcomes["skipped"] += len(ids) - len(got)
                self.outcomes["parked"] += parked
            for mid in set(ids) - got:
                if tags is not None:
                    self.finished.put(tags[mid])

    def dead_letter(self, m: ClaimedMessage, tags: Mapping[str, int] | None) -> None:
        """A message claimed with no try left (one that kills or stalls its worker every time
        comes here) is failed and dead-lettered, with the last error it had."""
        error = gave_up(m.tries, m.last_error)
        dead = Steady(self.c, self.deadline).fail(m, error, None, counted=False, dead_letter=True)
        with self.lock:
            self.outcomes["dead_lettered" if dead else "lost"] += 1
            if m.batch_id:
                self.batches.add(m.batch_id)
        if tags is not None:
            self.finished.put(tags[m.id])

    def steadily(self, what: str, action: Callable[[], T]) -> T:
        """`action()`, tried again while Postgres blips, for at most CLAIM_RETRY_S and while
        the invocation may still take work."""
        return through_blips(action, CLAIM_RETRY_S, lambda: self.stop_at - time.monotonic(), what)

    def providers_of(self, tenant: str, queue_id: str) -> list[Provider]:
        key = (tenant, queue_id)
        providers = self.providers.get(key)
        if providers is None:
            rows = self.steadily("loading providers", lambda: self.c.store.queue_providers(*key))
            providers = self.providers[key] = [provider_from_row(r, w) for r, w in rows]
            self.c.providers.prepare([p for p in providers if p.status == "active"])
        return providers

    def next_slot_in(self, tenant: str, queue_id: str) -> float:
        """Seconds until the queue's soonest provider has a slot (nothing is reserved); 0 when
        the limiter cannot say (a message taken then waits for it, as `process` has it)."""
        s = self.c.settings
        headroom = Headroom(s.limiter_guard_s, s.limiter_margin)
        usable = [p for p in self.providers_of(tenant, queue_id) if p.status == "active"]
        if not usable:
            return 0.0
        try:
            return self.c.limiter.reserve([provider_limits(p, headroom) for p in usable], -1.0).wait_s
        except LimiterUnavailable:
            return 0.0

    def start(self, m: ClaimedMessage, tag: int | None) -> None:
        key = (m.tenant_id, m.queue_id)
        providers = self.providers_of(*key)
        ticket = self.intake.ticket()
        with self.lock:
            self.held.add(m.id)

        def run() -> None:
            completed = False
            try:
                outcome = process(self.c, m, providers, self.deadline, self.call_budget, ticket)
                completed = outcome == "completed"
                with self.lock:
                    self.outcomes[outcome] += 1
                    if m.batch_id:
                        self.batches.add(m.batch_id)
                if tag is not None:
                    self.finished.put(tag)
            except BaseException as exc:  # only DependencyUnavailable gets here
                with self.lock:
                    self.errors.append(exc)
            finally:
                ticket.done(completed)
                with self.lock:
                    self.held.discard(m.id)

        self.futures.append(self.c.threads().submit(run))

    def consume(self, name: str) -> None:
        """Go on taking messages from the broker queue `name` (and its sibling shards)."""
        s = self.c.settings
        parsed = parse_shard(s.broker_prefix, name)
        if parsed is None:
            return
        tenant, queue_id, shard = parsed
        rows = self.steadily("reading the queue", lambda: self.c.store.queue_workers(tenant, queue_id))
        if not rows:
            return
        shards = self.c.names(tenant, queue_id).shards(max(rows[0]["shards"], shard + 1))
        reader = self.c.reader(shards[shard:] + shards[:shard])
        monitor = monitoring.InvocationReport(self.c, tenant, queue_id, shard, self.started)
        idle_since = time.monotonic()
        try:
            while not self.errors:
                self.tick(reader, monitor)
                now = time.monotonic()
                if now >= self.stop_at or SHUTTING_DOWN.is_set():
                    break
                room = self.intake.room_in(now)
                if (
                    room == 0
                    and self.intake.next_slot_after(self.stop_at)
                    and now + self.next_slot_in(tenant, queue_id) >= self.stop_at
                ):
                    # Near the end, only what can still start in time: the rest waits in the
                    # broker for the next invocation instead of being taken and parked.
                    room = PUMP_S
                if room > 0:
                    self.intake.wait(min(room, PUMP_S))
                    idle_since = now
                    continue
                try:
                    taken = self.read(reader, wait_s=min(PUMP_S, s.worker_idle_s))
                except NotFound:
                    log.info("%s was deleted; the invocation stops reading it", name)
                    break
                if taken or self.intake.in_flight:
                    idle_since = now
                elif now - idle_since >= s.worker_idle_s:
                    break
        finally:
            reader.stop()  # what is still out is acked as it finishes; nothing new comes in
            try:
                while any(not f.done() for f in self.futures):
                    self.tick(reader, monitor)
                    wait(self.futures, timeout=PUMP_S)
                self.tick(reader, monitor, final=True)
            finally:  # what was not acked goes back to the broker now, not when the socket dies
                reader.close()

    def read(self, reader: QueueReader, wait_s: float) -> int:
        """Take what is waiting (the first waited for up to `wait_s`), up to MAX_TAKE while the
        intake has room; how many."""
        tags: dict[str, int] = {}
        while wanted := self.intake.wanted(MAX_TAKE - len(tags), taking=len(tags)):
            got = reader.get(wanted, wait_s=0.0 if tags else wait_s)
            if got is None:
                break
            tag, body = got
            mid = dispatch.message_id_of(body)
            if mid is None or mid in tags:
                log.warning("skipping a malformed or repeated message (%d bytes)", len(body))
                with self.lock:
                    self.outcomes["malformed"] += 1
                reader.ack(tag)
                continue
            tags[mid] = tag
        self.take(list(tags), tags)
        return len(tags)

    def tick(self, reader: QueueReader, monitor: monitoring.InvocationReport, final: bool = False) -> None:
        """The reading thread's chores: acks, heartbeats, finished batches, the report."""
        while True:
            try:
                reader.ack(self.finished.get_nowait())
            except queue.Empty:
                break
        reader.pump()
        self.extend_leases()
        self.finish_batches()  # one cheap query per batch with news: none pending stops at once
        if final or monitor.due():
            monitor.send(self.intake, final=final)

    def extend_leases(self) -> None:
        now = time.monotonic()
        if now - self.leases_at < LEASE_RENEW_S:
            return
        self.leases_at = now
        with self.lock:
            held = list(self.held)
        if held:  # missed once (Postgres blipping), they still have the rest of LEASE_S
            quietly(self.c.store.extend_leases, held, LEASE_S)

    def finish_batches(self) -> None:
        """Finish the batches with news that are done; while Postgres blips, they are looked
        at again next time (and the sweeper finishes what an invocation could not)."""
        with self.lock:
            batches, self.batches = list(self.batches), set()
        for i, batch_id in enumerate(batches):
            try:
                self.c.store.finish_batch_if_done(batch_id)
            except DependencyUnavailable as exc:
                log.warning("finishing batches failed; again later: %s", exc.detail)
                with self.lock:
                    self.batches.update(batches[i:])
                return

    def drain(self) -> None:
        while any(not f.done() for f in self.futures):
            wait(self.futures, timeout=LEASE_RENEW_S)
            self.extend_leases()
        self.finish_batches()

    def result(self) -> dict[str, int]:
        if self.errors:
            raise self.errors[0]  # only DependencyUnavailable gets here: redeliver the whole batch
        return dict(+self.outcomes)


def park_held(c: Container, ids: set[str]) -> int:
    """A redelivered message another worker still leases comes back as that lease ends, so it
    is not lost if that worker died: from the longest delay queue not past the lease's end
    (one that comes back while the lease still runs is parked again), never a delay queue's
    step beyond it."""
    held = c.store.held_elsewhere(sorted(ids))
    for row in held:
        wait_s = at_most(row["lease_left_s"] + 1.0)
        dispatch.publish_later(c, row["tenant_id"], row["queue_id"], row["id"], wait_s)
    return len(held)
