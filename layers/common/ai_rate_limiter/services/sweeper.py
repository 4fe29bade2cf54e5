"""The scheduled sweep: publish what was committed and not confirmed by the broker in time,
finish batches whose messages are all done, move what is left in retired shards to the main
queue, deliver due webhooks."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..adapters.secrets_box import KeyUnreadable, is_sealed
from ..adapters.webhooks import Answer, batch_secret_id, endpoint_secret_id
from ..bootstrap import Container
from ..domain.backoff import backoff_s
from ..errors import AppError
from . import dispatch, shards
from .views import Row, all_counts, iso

log = logging.getLogger(__name__)

# A delivery is leased for its whole deadline plus this: taking it, building and signing the
# body before it leaves, writing its result after. The sender cuts a delivery at its deadline,
# so no delivery outlives its lease and another sweeper never sends the same one at once.
LEASE_MARGIN_S = 10.0
RESULT_MARGIN_S = 5.0  # of the margin, what is kept for writing the result
PARALLEL = 10  # deliveries sent at once: the webhook client's connections (bootstrap)
MAX_RETRY_S = 600.0
# A message whose lease ran out this long ago and that nobody took over has no copy left on the
# broker (a live one would have brought it back to a worker within the lease): it is queued again.
ORPHANED_S = 30.0
DRAIN_AT_ONCE = 500  # dead letters taken from the broker per round


def webhook_payload(c: Container, batch: Row) -> Row:
    counts = all_counts(c.store.batch_counts(str(batch["id"])))
    status = "cancelled" if batch.get("cancelled_at") else "completed"
    return {
        "event": f"batch.{status}",
        "batch_id": str(batch["id"]),
        "queue_id": batch["queue_id"],
        "status": status,
        "total": batch["total"],
        "counts": counts,
        "created_at": iso(batch["created_at"]),
        "finished_at": iso(batch["finished_at"]),
        "results_url": f"{c.settings.public_base_url}/batch/{batch['id']}/results",
    }


def webhook_id(batch_id: str, finishes: int = 1) -> str:
    """The event's id, the same on every attempt: a receiver's idempotency key. A batch opened
    again (its failed messages sent again) finishes anew, with a new id."""
    suffix = f"_{finishes}" if finishes > 1 else ""
    return "msg_" + batch_id.replace("-", "") + suffix


def webhook_retry_s(attempts: int, rand: float | None = None) -> float:
    """Full jitter: after attempt n, uniformly 1 s to 1 s + min(599 s, 2^n s) (3 s, 5 s, 9 s ...
    at most 10 minutes), so receivers that failed together are not retried together."""
    return 1.0 + backoff_s(attempts, base=2.0, cap=MAX_RETRY_S - 1.0, rand=rand)


def verdict(answer: Answer, attempts: int, max_attempts: int) -> tuple[str, str | None, float]:
    """(webhook status, last error, seconds until the next attempt) for an answer to attempt n.
    2xx: delivered. 410 Gone: the receiver wants no more: the delivery fails, and a tenant's
    endpoint is turned off. Anything else, a
    timeout or no connection: again later, no sooner than the receiver's Retry-After."""
    if answer.status is not None and 200 <= answer.status < 300:
        return "delivered", None, 0.0
    if answer.status == 410:
        return "failed", "endpoint gone (410)", 0.0
    if attempts >= max_attempts:
        return "failed", answer.error, 0.0
    delay = webhook_retry_s(attempts)
    if answer.retry_after_s is not None:
        delay = max(delay, min(answer.retry_after_s, MAX_RETRY_S))
    return "pending", answer.error, delay


def opened(c: Container, key_id: str, stored: str | None) -> list[str]:
    """The secret a delivery is signed with, stored sealed; batches stored before signing
    existed have none (theirs go out unsigned), and before sealing, one in the clear."""
    if not stored:
        return []
    return [c.keys.open(key_id, stored) if is_sealed(stored) else stored]


@dataclass(frozen=True)
class Delivery:
    """One attempt at sending one batch event to one receiver: the batch's own `webhook_url`,
    or one of its tenant's endpoints. `row` is the batch as leased, with the attempt's number."""

    row: Row
    url: str
    attempt: int
    key_id: str  # what its secret is sealed for
    secret: str | None
    endpoint_id: str | None = None

    @classmethod
    def of_batch(cls, row: Row) -> Delivery:
        key_id = batch_secret_id(str(row["id"]))
        return cls(row, row["webhook_url"], row["webhook_attempts"], key_id, row.get("webhook_secret"))

    @classmethod
    def to_endpoint(cls, row: Row) -> Delivery:
        endpoint = row["endpoint_id"]
        return cls(row, row["url"], row["attempts"], endpoint_secret_id(endpoint), row["secret"], endpoint)

    def __str__(self) -> str:
        batch = f"batch {self.row['id']}"
        return f"webhook for {batch}" if self.endpoint_id is None else f"endpoint {self.endpoint_id}, {batch}"

    def record(self, c: Container, answer: Answer, status: str, error: str | None, retry_s: float) -> bool:
        if self.endpoint_id is None:
            return c.store.webhook_result(str(self.row["id"]), self.attempt, status, error, retry_s)
        return c.store.delivery_result(self.row, status, error, retry_s, gone=answer.status == 410)


def deliver(c: Container, d: Delivery, leased_until: float) -> str:
    """One attempt; its outcome: delivered, failed, pending or stale."""
    s = c.settings
    body = json.dumps(webhook_payload(c, d.row), separators=(",", ":"), default=str).encode()
    deadline_s = min(s.webhook_timeout_s, leased_until - time.monotonic() - RESULT_MARGIN_S)
    try:
        secrets = opened(c, d.key_id, d.secret)
    except KeyUnreadable as exc:  # nothing that should be signed goes out unsigned
        answer = Answer(None, exc.detail)
    else:
        if deadline_s > 0:
            answer = c.webhooks.send(
                d.url, webhook_id(str(d.row["id"]), d.row.get("finishes", 1)), body, secrets, deadline_s
            )
        else:
            answer = Answer(None, "the lease ran out before the delivery could leave")
    status, error, retry_s = verdict(answer, d.attempt, s.webhook_max_attempts)
    if not d.record(c, answer, status, error, retry_s):
        log.warning("%s: attempt %d ended after its lease; not recorded", d, d.attempt)
        return "stale"
    if status == "failed":
        log.warning("%s failed for good: %s", d, error)
    return status


def take_due(c: Container, wanted: int, lease_s: float) -> list[Delivery]:
    """Batches' own webhooks first, then deliveries to endpoints, `wanted` at most in all."""
    due = [Delivery.of_batch(r) for r in c.store.take_due_webhooks(wanted, lease_s=lease_s)]
    if len(due) < wanted:
        due += [Delivery.to_endpoint(r) for r in c.store.take_due_deliveries(wanted - len(due), lease_s)]
    return due


def deliver_webhooks(c: Container, limit: int = 20) -> dict[str, int]:
    """Up to `limit` due deliveries, PARALLEL at a time, each round leased just before it is sent."""
    s = c.settings
    lease_s = s.webhook_timeout_s + LEASE_MARGIN_S
    outcomes: list[str] = []
    while len(outcomes) < limit:
        leased_until = time.monotonic() + lease_s  # before the lease is taken: never later than it
        wanted = min(PARALLEL, limit - len(outcomes))
        due = take_due(c, wanted, lease_s)
        if due:
            with ThreadPoolExecutor(len(due), thread_name_prefix="webhook") as pool:
                outcomes += pool.map(deliver, [c] * len(due), due, [leased_until] * len(due))
        if len(due) < wanted:
            break
    return {
        "webhooks_sent": outcomes.count("delivered"),
        "webhooks_failed": outcomes.count("failed"),
        "webhooks_retrying": outcomes.count("pending"),
    }


def recover(c: Container) -> dict[str, int]:
    """Messages with no copy left on the broker: those whose lease ran out more than
    ORPHANED_S ago with nobody taking them over, and those the broker dead-lettered after too
    many deliveries without an outcome. Each is counted as a try: with tries left it is queued
    for the relay to publish now; without, its row is failed and says why. A dead-lettered copy
    leaves the dead-letter queue only once its row says what became of it."""
    s = c.settings
    settled = c.store.requeue_or_dead_letter(s.max_attempts, grace_s=ORPHANED_S)

    def settle(bodies: list[bytes]) -> None:  # no broker in here: its channel is draining
        ids = [mid for body in bodies if (mid := dispatch.message_id_of(body)) is not None]
        settled.extend(c.store.requeue_or_dead_letter(s.max_attempts, ids=ids))

    for tenant, queue_id in c.store.all_queues():
        name = c.names(tenant, queue_id).dead_letter
        try:
            while c.broker.drain(name, settle, DRAIN_AT_ONCE) == DRAIN_AT_ONCE:
                pass
        except AppError as exc:  # its queue is gone or the broker is down: the next sweep
            log.warning("dead letters of %s not read: %s", name, exc.detail)
    dead = [r for r in settled if r["spent"]]
    dispatch.rest_dead(c, dead)
    return {"requeued": len(settled) - len(dead), "dead_lettered": len(dead)}


def sweep(c: Container) -> dict[str, int]:
    recovered = recover(c)
    relayed = dispatch.relay(c)
    c.store.forget_idempotency_keys(c.settings.idempotency_ttl_s)
    finished = c.store.finish_batches()
    moved = shards.fold_retired(c)
    return {
        **recovered,
        "relayed": relayed,
        "batches_finished": finished,
        "moved_from_retired_shards": moved,
        **deliver_webhooks(c),
    }
