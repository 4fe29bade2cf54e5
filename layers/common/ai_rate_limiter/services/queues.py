"""Queues: a name, its providers, and a broker queue with a dead-letter queue."""

from __future__ import annotations

import logging
from typing import Any

from ..bootstrap import Container
from ..domain.schemas import ProviderRef, QueueIn, parse
from ..errors import AppError, Conflict, ValidationFailed
from . import providers
from .views import Row, all_counts, iso, provider_view

log = logging.getLogger(__name__)


def create(c: Container, tenant: str, body: Any) -> Row:
    q = parse(QueueIn, body)
    new_rows: list[Row] = []
    links: list[Row] = []
    for p in q.providers:
        if isinstance(p, ProviderRef):
            links.append({"provider_id": providers.checked_id(p.provider_id, "provider"), "weight": p.weight})
        else:
            row = providers.provider_row(p)
            new_rows.append(row)
            links.append({"provider_id": row["id"], "weight": 1.0})
    if len({link["provider_id"] for link in links}) != len(links):
        raise ValidationFailed("providers: the same provider is listed twice.")
    created = {r["id"] for r in new_rows}
    c.store.require_providers(tenant, [lk["provider_id"] for lk in links if lk["provider_id"] not in created])
    if c.store.queue_exists(tenant, q.queue_id):
        raise Conflict(f"Queue {q.queue_id} already exists.")
    c.broker.declare(c.names(tenant, q.queue_id))
    c.store.create_queue(tenant, q.queue_id, new_rows, links)
    return get(c, tenant, q.queue_id)


def get(c: Container, tenant: str, queue_id: str) -> Row:
    queue = c.store.get_queue(tenant, queue_id)
    return {
        "queue_id": queue["queue_id"],
        "created_at": iso(queue["created_at"]),
        "providers": [provider_view(r, w) for r, w in c.store.queue_providers(tenant, queue_id)],
        "counts": all_counts(queue["counts"]),
    }


def list_all(c: Container, tenant: str) -> Row:
    return {
        "queues": [
            {"queue_id": r["queue_id"], "created_at": iso(r["created_at"]), "provider_ids": r["provider_ids"]}
            for r in c.store.list_queues(tenant)
        ]
    }


def delete(c: Container, tenant: str, queue_id: str) -> Row:
    batches = c.store.delete_queue(tenant, queue_id)
    try:
        c.broker.delete(c.names(tenant, queue_id))
    except AppError as exc:
        log.warning("queue %s deleted but its broker queue was not: %s", queue_id, exc.detail)
    for batch_id in batches:
        c.store.finish_batch_if_done(batch_id)
    return {"queue_id": queue_id, "deleted": True}
