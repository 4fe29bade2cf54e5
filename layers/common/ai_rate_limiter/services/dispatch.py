"""The one publish step: committed message ids to the queue's broker queue, and the relay of
those whose publish was not confirmed (the outbox)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..bootstrap import Container
from ..domain.models import ClaimedMessage
from ..errors import NotFound
from ..ports import WorkerPorts


def message_body(tenant: str, message_id: str) -> bytes:
    return message_bodies(tenant, [message_id])[0]


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


def relay(c: Container, limit: int = 10_000) -> int:
    """Publish what was committed and not confirmed in time: a submission whose process died
    or whose publish failed after the commit. A message may so reach the broker twice (its
    first publish was confirmed, the mark was not); the worker claims it once. A broker queue
    that has gone is declared again. How many were published."""
    work: list[tuple[str, str, list[str], str | None]] = [
        (b["tenant_id"], b["queue_id"], b["messages"], b["id"]) for b in c.store.batches_to_relay(100)
    ]
    groups: dict[tuple[str, str], list[str]] = {}
    for r in c.store.to_relay(limit):
        groups.setdefault((r["tenant_id"], r["queue_id"]), []).append(r["id"])
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


def publish_later(c: WorkerPorts, tenant: str, queue_id: str, message_id: str, delay_s: float) -> None:
    c.broker.publish_delayed(c.names(tenant, queue_id), message_body(tenant, message_id), delay_s)


def defer(c: WorkerPorts, msg: ClaimedMessage, delay_s: float, note: str | None) -> None:
    """Hand a claimed message back to the queue, to be delivered again after `delay_s`. If its
    delayed copy does not reach the broker, the relay publishes it (a message released and not
    published is the relay's, as a new one is): a failed publish strands nothing."""
    if c.store.release(msg, note):
        publish_later(c, msg.tenant_id, msg.queue_id, msg.id, delay_s)
        c.store.published([msg.id])
