"""The scheduled sweep: finish batches whose messages are all done, move what is left in retired
shards to the main queue, deliver due webhooks."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from ..adapters.secrets_box import KeyUnreadable, is_sealed
from ..adapters.webhooks import Answer
from ..bootstrap import Container
from ..domain.backoff import backoff_s
from . import shards
from .messages import webhook_key_id
from .views import Row, all_counts, iso

log = logging.getLogger(__name__)

# A delivery is leased for its whole deadline plus this: taking it, building and signing the
# body before it leaves, writing its result after. The sender cuts a delivery at its deadline,
# so no delivery outlives its lease and another sweeper never sends the same one at once.
LEASE_MARGIN_S = 10.0
RESULT_MARGIN_S = 5.0  # of the margin, what is kept for writing the result
PARALLEL = 10  # deliveries sent at once: the webhook client's connections (bootstrap)
MAX_RETRY_S = 600.0


def webhook_payload(c: Container, batch: Row) -> Row:
    counts = all_counts(c.store.batch_counts(str(batch["id"])))
    return {
        "event": "batch.completed",
        "batch_id": str(batch["id"]),
        "queue_id": batch["queue_id"],
        "status": "completed",
        "total": batch["total"],
        "counts": counts,
        "created_at": iso(batch["created_at"]),
        "finished_at": iso(batch["finished_at"]),
        "results_url": f"{c.settings.public_base_url}/batch/{batch['id']}/results",
    }


def webhook_id(batch_id: str) -> str:
    """The event's id, the same on every attempt: a receiver's idempotency key."""
    return "msg_" + batch_id.replace("-", "")


def webhook_retry_s(attempts: int, rand: float | None = None) -> float:
    """Full jitter: after attempt n, uniformly 1 s to 1 s + min(599 s, 2^n s) (3 s, 5 s, 9 s ...
    at most 10 minutes), so receivers that failed together are not retried together."""
    return 1.0 + backoff_s(attempts, base=2.0, cap=MAX_RETRY_S - 1.0, rand=rand)


def verdict(answer: Answer, attempts: int, max_attempts: int) -> tuple[str, str | None, float]:
    """(webhook status, last error, seconds until the next attempt) for an answer to attempt n.
    2xx: delivered. 410 Gone: the receiver wants no more, the endpoint is off. Anything else, a
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


def webhook_secrets(c: Container, batch_id: str, stored: str | None) -> list[str]:
    """The secret a batch's deliveries are signed with: stored sealed; batches stored before
    signing existed have none (theirs go out unsigned), and before sealing, one in the clear."""
    if not stored:
        return []
    return [c.keys.open(webhook_key_id(batch_id), stored) if is_sealed(stored) else stored]


def deliver(c: Container, batch: Row, leased_until: float) -> str:
    """One attempt at one batch's webhook; its outcome: delivered, failed, pending or stale."""
    s = c.settings
    batch_id, attempt = str(batch["id"]), batch["webhook_attempts"]
    body = json.dumps(webhook_payload(c, batch), separators=(",", ":"), default=str).encode()
    deadline_s = min(s.webhook_timeout_s, leased_until - time.monotonic() - RESULT_MARGIN_S)
    try:
        secrets = webhook_secrets(c, batch_id, batch.get("webhook_secret"))
    except KeyUnreadable as exc:  # nothing that should be signed goes out unsigned
        answer = Answer(None, exc.detail)
    else:
        if deadline_s > 0:
            answer = c.webhooks.send(batch["webhook_url"], webhook_id(batch_id), body, secrets, deadline_s)
        else:
            answer = Answer(None, "the lease ran out before the delivery could leave")
    status, error, retry_s = verdict(answer, attempt, s.webhook_max_attempts)
    if not c.store.webhook_result(batch_id, attempt, status, error, retry_s):
        log.warning("webhook for batch %s: attempt %d ended after its lease; not recorded", batch_id, attempt)
        return "stale"
    if status == "failed":
        log.warning("webhook for batch %s failed for good: %s", batch_id, error)
    return status


def deliver_webhooks(c: Container, limit: int = 20) -> dict[str, int]:
    """Up to `limit` due deliveries, PARALLEL at a time, each round leased just before it is sent."""
    s = c.settings
    lease_s = s.webhook_timeout_s + LEASE_MARGIN_S
    outcomes: list[str] = []
    while len(outcomes) < limit:
        leased_until = time.monotonic() + lease_s  # before the lease is taken: never later than it
        wanted = min(PARALLEL, limit - len(outcomes))
        due = c.store.take_due_webhooks(wanted, lease_s=lease_s)
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


def sweep(c: Container) -> dict[str, int]:
    finished = sum(c.store.finish_batch_if_done(b) for b in c.store.unfinished_batches())
    moved = shards.fold_retired(c)
    return {"batches_finished": finished, "moved_from_retired_shards": moved, **deliver_webhooks(c)}
