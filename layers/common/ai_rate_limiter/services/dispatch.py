"""The one publish step: message ids to the queue's broker queue (an outbox can feed it later)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..bootstrap import Container
from ..domain.models import ClaimedMessage
from ..ports import WorkerPorts


def message_body(tenant: str, message_id: str) -> bytes:
    return message_bodies(tenant, [message_id])[0]


def message_bodies(tenant: str, ids: Sequence[str]) -> list[bytes]:
    """`{"message_id": ..., "tenant_id": ...}` for each id: the tenant is encoded once, and an
    id is a UUID's text, which needs no escaping."""
    head, tail = '{"message_id": "', f'", "tenant_id": {json.dumps(tenant)}}}'
    return [f"{head}{mid}{tail}".encode() for mid in ids]


def publish(c: Container, tenant: str, queue_id: str, ids: Sequence[str], workers: int = 1) -> None:
    """Spread over the queue's `workers` shards, in turn, so each worker's event source mapping
    has work to start on and input order is kept within each shard."""
    names = c.names(tenant, queue_id)
    for i in range(min(workers, len(ids))):
        c.broker.publish(names.shard(i), message_bodies(tenant, ids[i::workers]))


def publish_later(c: WorkerPorts, tenant: str, queue_id: str, message_id: str, delay_s: float) -> None:
    c.broker.publish_delayed(c.names(tenant, queue_id), message_body(tenant, message_id), delay_s)


def defer(c: WorkerPorts, msg: ClaimedMessage, delay_s: float, note: str | None) -> None:
    """Hand a claimed message back to the queue, to be delivered again after `delay_s`."""
    if c.store.release(msg, note):
        publish_later(c, msg.tenant_id, msg.queue_id, msg.id, delay_s)
