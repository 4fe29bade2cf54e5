"""The one publish step: committed message ids to the queue's broker queue, and the relay of
those whose publish was not confirmed (the outbox)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence

from ..bootstrap import Container
from ..domain.models import ClaimedMessage
from ..errors import AppError, NotFound
from ..ports import Row, WorkerPorts

log = logging.getLogger(__name__)


def message_body(tenant: str, message_id: str) -> bytes:
    return message_bodies(tenant, [message_id])[0]


def message_id_of(body: bytes) -> str | None:
    """The message id a body carries (what `message_body` made), or None for any other body:
    whatever a queue holds, reading it never raises."""
    try:
        doc = json.loads(body)
        mid = doc.get("message_id") if isinstance(doc, dict) else None
        return str(uuid.UUID(mid)) if isinstance(mid, str) else None
    except ValueError:  # not JSON, not UTF-8, not a UUID
        return None


def message_bodies(tenant: str, ids: Sequence[str]) -> list[bytes]:
    """`{"message_id": ..., "tenant_id": ...}` for each id: the tenant is encoded once, and an
    id is a UUID's text, which needs no escaping."""
    head, tail = '{"message_id": "', f'", "tenant_id": {json.dumps(tenant)}}}'
    return [f"{head}{mid}{tail}".encode() for mid in ids]


def publish(
    c: Container,
    tenant: str,
    queue_id: str,
    ids: Sequence[str],
    workers: int = 1,
    batch_id: str | None = None,
) -> None:
    """Committed messages to the broker, spread over the queue's `workers` shards in turn, so
    each worker's event source mapping has work to start on and input order is kept within
    each shard. They are marked published once the broker has confirmed them (a batch's as
    one, once every shard is; others shard by shard); until then the sweeper would relay them
    (`relay`)."""
    names = c.names(tenant, queue_id)
    for i in range(min(workers, len(ids))):
        shard = ids[i::workers]
        c.broker.publish(names.shard(i), message_bodies(tenant, shard))
        if batch_id is None:
            c.store.published(shard)
    if batch_id is not None:
        c.store.batch_published(batch_id)


def publish_or_leave(
    c: Container, tenant: str, queue_id: str, ids: Sequence[str], workers: int, batch_id: str | None = None
) -> None:
    """`publish`, for messages just committed: one that fails or is cut short is finished by
    the relay, so the answer to the request that committed them stands either way."""
    try:
        publish(c, tenant, queue_id, ids, workers, batch_id)
    except AppError as exc:
        log.warning(
            "%d message(s) for %s committed; the relay publishes them: %s", len(ids), queue_id, exc.detail
        )


def by_queue(rows: Sequence[Row]) -> dict[tuple[str, str], list[str]]:
    """Message ids (`id`) by their (`tenant_id`, `queue_id`), in order."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        groups.setdefault((r["tenant_id"], r["queue_id"]), []).append(r["id"])
    return groups


def requeue(c: Container, rows: Sequence[Row]) -> int:
    """Publish messages queued again (`id`, `tenant_id`, `queue_id`), their dead-letter copies
    taken off; how many."""
    unrest_dead(c, rows)
    for (tenant, queue_id), ids in by_queue(rows).items():
        queue = c.store.queue_workers(tenant, queue_id)
        publish_or_leave(c, tenant, queue_id, ids, queue[0]["workers"] if queue else 1)
    return len(rows)


def relay(c: Container, limit: int = 10_000) -> int:
    """Publish what was committed and not confirmed in time: a submission whose process died
    or whose publish failed after the commit. A message may so reach the broker twice (its
    first publish was confirmed, the mark was not); the worker claims it once. A broker queue
    that has gone is declared again. How many were published."""
    work: list[tuple[str, str, list[str], str | None]] = [
        (b["tenant_id"], b["queue_id"], b["messages"], b["id"]) for b in c.store.batches_to_relay(100)
    ]
    groups = by_queue(c.store.to_relay(limit))
    work += [(tenant, queue_id, ids, None) for (tenant, queue_id), ids in groups.items()]
    done = 0
    for tenant, queue_id, ids, batch_id in work:
        queue = c.store.queue_workers(tenant, queue_id)
        if not queue:
            continue  # deleted meanwhile: its messages went with it
        workers = queue[0]["workers"]
        try:
            publish(c, tenant, queue_id, ids, workers, batch_id)
        except NotFound:
            c.broker.declare(c.names(tenant, queue_id), workers)
            publish(c, tenant, queue_id, ids, workers, batch_id)
        done += len(ids)
    return done


PRUNE_AT_ONCE = 10_000  # copies a replay looks through in a dead-letter queue


def rest_dead(c: WorkerPorts, rows: Sequence[Row]) -> None:
    """A copy of each message that used up its tries (`id`, `tenant_id`, `queue_id`, and
    `last_error`: why) into its queue's dead-letter queue, once its row says so. Best effort:
    the row is the record, and a copy that cannot be published is only missing there."""
    why = {r["id"]: str(r["last_error"] or "") for r in rows}
    for (tenant, queue_id), ids in by_queue(rows).items():
        copies = list(zip(message_bodies(tenant, ids), (why[mid] for mid in ids), strict=True))
        try:
            c.broker.publish_dead(c.names(tenant, queue_id), copies)
        except AppError as exc:
            log.warning("%d dead-letter copies for %s not published: %s", len(ids), queue_id, exc.detail)


def unrest_dead(c: Container, rows: Sequence[Row]) -> None:
    """The dead-letter copies of messages queued again (`id`, `tenant_id`, `queue_id`) are taken
    off, so that none stays there with its row no longer saying it was dead-lettered. Best
    effort."""
    for (tenant, queue_id), ids in by_queue(rows).items():
        try:
            c.broker.prune_dead(c.names(tenant, queue_id), one_of(set(ids)), PRUNE_AT_ONCE)
        except AppError as exc:
            log.warning("dead-letter copies of %s not taken off: %s", queue_id, exc.detail)


def one_of(ids: set[str]) -> Callable[[bytes], bool]:
    """Whether a body is one of these messages'."""
    return lambda body: message_id_of(body) in ids


def publish_later(c: WorkerPorts, tenant: str, queue_id: str, message_id: str, delay_s: float) -> None:
    c.broker.publish_delayed(c.names(tenant, queue_id), message_body(tenant, message_id), delay_s)


def defer(c: WorkerPorts, msg: ClaimedMessage, delay_s: float, note: str | None) -> None:
    """Hand a claimed message back to the queue, to be delivered again after `delay_s`. If its
    delayed copy does not reach the broker, the relay publishes it (a message released and not
    published is the relay's, as a new one is): a failed publish strands nothing."""
    if c.store.release(msg, note):
        try:
            publish_later(c, msg.tenant_id, msg.queue_id, msg.id, delay_s)
        except NotFound as exc:  # its delay queue is gone: the relay declares it again
            log.warning("the delayed copy of %s was refused; the relay publishes it: %s", msg.id, exc.detail)
            return
        c.store.published([msg.id])
