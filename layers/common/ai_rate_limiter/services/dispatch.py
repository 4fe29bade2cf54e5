"""The one publish step: message ids to the queue's broker queue (an outbox can feed it later)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..bootstrap import Container
from ..domain.models import ClaimedMessage


def message_body(tenant: str, message_id: str) -> bytes:
    return json.dumps({"message_id": message_id, "tenant_id": tenant}).encode()


def publish(c: Container, tenant: str, queue_id: str, ids: Sequence[str]) -> None:
    bodies = [message_body(tenant, mid) for mid in ids]
    c.broker.publish(c.names(tenant, queue_id).main, bodies)


def publish_later(c: Container, tenant: str, queue_id: str, message_id: str, delay_s: float) -> None:
    c.broker.publish_delayed(c.names(tenant, queue_id), message_body(tenant, message_id), delay_s)


def defer(c: Container, msg: ClaimedMessage, delay_s: float, note: str | None) -> None:
    """Hand a claimed message back to the queue, to be delivered again after `delay_s`."""
    if c.store.release(msg, note):
        publish_later(c, msg.tenant_id, msg.queue_id, msg.id, delay_s)
