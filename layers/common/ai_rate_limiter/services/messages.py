"""Messages: submit one prompt or a batch, read one back, cancel or delete it."""

from __future__ import annotations

import gc
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..adapters.egress import check_destination
from ..adapters.webhooks import batch_secret_id, new_secret
from ..bootstrap import Container
from ..domain.models import ChatRequest
from ..domain.schemas import BatchIn, MessageFields, MessageIn, parse
from ..errors import AppError, Conflict, NotFound, PayloadTooLarge
from . import dispatch
from .providers import checked_id
from .views import Row, message_view


def chat_request(m: MessageFields) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "user", "content": m.prompt}],
        system=m.system,
        model=m.model,
        max_tokens=m.max_tokens,
        temperature=m.temperature,
        extra=m.extra or {},
    )


@contextmanager
def collection_paused() -> Iterator[None]:
    """Building 100,000 rows allocates millions of objects; the garbage collector's passes over
    them would more than double the time, and none of them is garbage yet."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))  # byte 6: the version's high nibble
_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))  # byte 8: the variant's two bits


def new_ids(n: int) -> list[str]:
    """n random (version 4) UUIDs as text, from one read of the system's random source, with
    the version and variant bits set for all of them at once."""
    raw = bytearray(secrets.token_bytes(16 * n))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_RFC_4122)
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


def message_row(queue_id: str, m: MessageFields, batch_id: str | None, seq: int, id_: str = "") -> Row:
    return {
        "id": id_ or str(uuid.uuid4()),
        "queue_id": queue_id,
        "batch_id": batch_id,
        "seq": seq,
        "custom_id": m.custom_id,
        "request": chat_request(m).to_json(),
        "metadata": m.metadata,
    }


def submit(c: Container, tenant: str, body: Any) -> Row:
    """The seed's single form (`prompt`) or batch form (`messages`); 202 either way."""
    if isinstance(body, dict) and "messages" in body:
        return _submit_batch(c, tenant, body)
    msg = parse(MessageIn, body)
    row = message_row(msg.queue_id, msg, None, 0)
    _store_and_publish(c, tenant, msg.queue_id, None, [row])
    return {"message_id": row["id"], "status": "queued", "queue_id": msg.queue_id}


def _submit_batch(c: Container, tenant: str, body: dict[str, Any]) -> Row:
    items = body.get("messages")
    if isinstance(items, list) and len(items) > c.settings.max_batch_size:
        raise PayloadTooLarge(
            f"A batch holds at most {c.settings.max_batch_size} messages; got {len(items)}."
        )
    with collection_paused():
        batch_in = parse(BatchIn, body)
        if batch_in.webhook_url is not None:  # checked again at every delivery
            check_destination(batch_in.webhook_url, c.settings.egress_allow, "webhook_url")
        batch_id = str(uuid.uuid4())
        ids = new_ids(len(batch_in.messages))
        rows = [
            message_row(batch_in.queue_id, m, batch_id, i, ids[i]) for i, m in enumerate(batch_in.messages)
        ]
    # The webhook's signing secret is made here and shown once, in this answer; afterwards only
    # the sweeper reads it (GET /batch shows the webhook without it).
    secret = new_secret() if batch_in.webhook_url else None
    batch = {
        "id": batch_id,
        "queue_id": batch_in.queue_id,
        "total": len(rows),
        "webhook_url": batch_in.webhook_url,
        "webhook_event": batch_in.webhook_event if batch_in.webhook_url else None,
        # stored sealed, as provider keys are: a database dump alone signs nothing
        "webhook_secret": None if secret is None else c.keys.seal(batch_secret_id(batch_id), secret),
    }
    _store_and_publish(c, tenant, batch_in.queue_id, batch, rows)
    answer: Row = {
        "batch_id": batch_id,
        "total": len(rows),
        "status": "queued",
        "queue_id": batch_in.queue_id,
    }
    if secret is not None:
        answer["webhook_secret"] = secret
    return answer


def _store_and_publish(c: Container, tenant: str, queue_id: str, batch: Row | None, rows: list[Row]) -> None:
    """Store first, then publish; if publishing fails, the stored rows are removed again."""
    queue = c.store.queue_workers(tenant, queue_id)
    if not queue:
        raise NotFound(f"No queue {queue_id}.")
    c.store.insert_messages(tenant, batch, rows)
    ids = [r["id"] for r in rows]
    try:
        dispatch.publish(c, tenant, queue_id, ids, queue[0]["workers"])
    except AppError:
        c.store.discard_messages(tenant, batch["id"] if batch else None, ids)
        raise


def read(c: Container, tenant: str, message_id: str) -> Row:
    return message_view(c.store.get_message(tenant, checked_id(message_id, "message")))


def delete(c: Container, tenant: str, message_id: str) -> Row:
    """Queued: cancelled. Finished and not in a batch: deleted. In flight: 409."""
    message_id = checked_id(message_id, "message")
    cancelled = c.store.cancel_message(tenant, message_id)
    if cancelled is not None:
        if cancelled["batch_id"]:
            c.store.finish_batch_if_done(str(cancelled["batch_id"]))
        return {"message_id": message_id, "status": "cancelled"}
    current = c.store.get_message(tenant, message_id)
    if current["status"] == "processing":
        raise Conflict("The message is being processed now; it can no longer be cancelled.")
    if current["batch_id"] is not None:
        raise Conflict("A finished message that belongs to a batch stays with its batch.")
    if not c.store.delete_message(tenant, message_id):
        raise Conflict("The message changed while it was being deleted; try again.")
    return {"message_id": message_id, "deleted": True}
