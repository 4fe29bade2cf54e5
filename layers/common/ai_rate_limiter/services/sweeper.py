"""The scheduled sweep: finish batches whose messages are all done, deliver due webhooks."""

from __future__ import annotations

import logging

from ..bootstrap import Container
from ..domain.backoff import backoff_s
from .views import Row, all_counts, iso

log = logging.getLogger(__name__)


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


def webhook_retry_s(attempts: int) -> float:
    """2 s, 3 s, 5 s, 9 s ... up to 10 minutes between deliveries."""
    return backoff_s(attempts, base=2.0, cap=600.0, rand=0.5) + 1.0


def deliver_webhooks(c: Container, limit: int = 20) -> dict[str, int]:
    s = c.settings
    sent = failed = retrying = 0
    for batch in c.store.take_due_webhooks(limit, lease_s=s.webhook_timeout_s * 2 + 5):
        error = c.webhooks.send(batch["webhook_url"], webhook_payload(c, batch))
        attempts = batch["webhook_attempts"]
        if error is None:
            c.store.webhook_result(str(batch["id"]), "delivered", None, 0)
            sent += 1
        elif attempts >= s.webhook_max_attempts:
            log.warning("webhook for batch %s failed for good: %s", batch["id"], error)
            c.store.webhook_result(str(batch["id"]), "failed", error, 0)
            failed += 1
        else:
            c.store.webhook_result(str(batch["id"]), "pending", error, webhook_retry_s(attempts))
            retrying += 1
    return {"webhooks_sent": sent, "webhooks_failed": failed, "webhooks_retrying": retrying}


def sweep(c: Container) -> dict[str, int]:
    finished = sum(c.store.finish_batch_if_done(b) for b in c.store.unfinished_batches())
    return {"batches_finished": finished, **deliver_webhooks(c)}
