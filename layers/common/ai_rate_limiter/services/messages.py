"""Messages: submit one prompt or a batch, read one back, cancel or delete it."""

from __future__ import annotations

import gc
import hashlib
import hmac
import json
import logging
import re
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..adapters.egress import check_destination
from ..adapters.postgres import KeyTaken
from ..adapters.webhooks import batch_secret_id, new_secret
from ..bootstrap import Container
from ..domain.models import ChatRequest
from ..domain.schemas import BatchIn, MessageFields, MessageIn, parse
from ..errors import Conflict, NotFound, PayloadTooLarge, field_error, invalid
from . import dispatch
from .providers import checked_id
from .views import Row, message_view

log = logging.getLogger(__name__)


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


IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, as a header carries it


@dataclass(frozen=True)
class Submission:
    """What a submission stores and answers, known before anything is written."""

    queue_id: str
    batch: Row | None
    rows: list[Row]
    answer: Row


def submit(c: Container, tenant: str, body: Any, idempotency_key: str | None = None) -> Row:
    """The seed's single form (`prompt`) or batch form (`messages`); 202 either way. With an
    `Idempotency-Key`, the same key and body answer what the first did (and store nothing
    more); the same key with another body is 422. The key is taken in the submission's own
    transaction, so two sent at once make one submission."""
    key = None if idempotency_key is None else idempotency(tenant, idempotency_key, body)
    if key is not None and (first := replayed(c, tenant, key)) is not None:
        return first
    if isinstance(body, dict) and "messages" in body:
        made = _batch(c, body)
    else:
        msg = parse(MessageIn, body)
        row = message_row(msg.queue_id, msg, None, 0)
        made = Submission(
            msg.queue_id, None, [row], {"message_id": row["id"], "status": "queued", "queue_id": msg.queue_id}
        )
    if key is not None:
        sealed = c.keys.seal(key["secret_id"], json.dumps(made.answer))
        key = {**key, "answer": sealed, "ttl_s": c.settings.idempotency_ttl_s}
    try:
        _store_and_publish(c, tenant, made, key)
    except KeyTaken:  # another request with the key committed first
        assert key is not None
        first = replayed(c, tenant, key)
        if first is None:
            raise Conflict("A request with this Idempotency-Key is being answered; send it again.") from None
        return first
    return made.answer


def idempotency(tenant: str, key: str, body: Any) -> Row:
    if not IDEMPOTENCY_KEY.match(key):
        raise invalid([field_error(["Idempotency-Key"], "1 to 255 printable ASCII characters")])
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    name = hashlib.sha256(f"{tenant}\n{key}".encode()).hexdigest()
    return {"key": key, "body_hash": digest.digest(), "secret_id": f"idempotency-{name}"}


def replayed(c: Container, tenant: str, key: Row) -> Row | None:
    """The first answer to this key and body; None if the key is free."""
    first = c.store.idempotent_answer(tenant, key["key"], c.settings.idempotency_ttl_s)
    if first is None:
        return None
    if not hmac.compare_digest(first["body_hash"], key["body_hash"]):
        raise invalid(
            [
                field_error(
                    ["Idempotency-Key"], "was sent before with another body; use a new key for this one"
                )
            ]
        )
    answer: Row = json.loads(c.keys.open(key["secret_id"], first["answer"]))
    return answer


def _batch(c: Container, body: dict[str, Any]) -> Submission:
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
    answer: Row = {
        "batch_id": batch_id,
        "total": len(rows),
        "status": "queued",
        "queue_id": batch_in.queue_id,
    }
    if secret is not None:
        answer["webhook_secret"] = secret
    return Submission(batch_in.queue_id, batch, rows, answer)


def _store_and_publish(c: Container, tenant: str, made: Submission, key: Row | None) -> None:
    """Commit, then publish (the outbox): once the rows are committed the submission stands.
    A publish that fails or is cut short is finished by the sweeper's relay, so the answer is
    202 either way, and a client never has a reason to send the same batch twice."""
    queue = c.store.queue_workers(tenant, made.queue_id)
    if not queue:
        raise NotFound(f"No queue {made.queue_id}.")
    c.store.insert_messages(tenant, made.batch, made.rows, key)
    ids, batch_id = [r["id"] for r in made.rows], made.batch["id"] if made.batch else None
    dispatch.publish_or_leave(c, tenant, made.queue_id, ids, queue[0]["workers"], batch_id)


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


def retry(c: Container, tenant: str, message_id: str) -> Row:
    """Send a failed or cancelled message again, with its tries back to none (its batch, if
    finished, is open again until it is done)."""
    message_id = checked_id(message_id, "message")
    requeued = c.store.requeue(tenant, message_id=message_id)
    if not requeued:
        status = c.store.get_message(tenant, message_id)["status"]  # 404 if there is none
        raise Conflict(f"Only a failed or cancelled message is sent again; this one is {status}.")
    dispatch.requeue(c, requeued)
    return {"message_id": message_id, "status": "queued"}
