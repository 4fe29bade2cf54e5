"""Queues: a name, its providers, and a broker queue with a dead-letter queue."""

from __future__ import annotations

import logging
from typing import Any

from ..bootstrap import Container
from ..domain.schemas import ProviderRef, QueueIn, QueuePatch, parse
from ..errors import AppError, Conflict, NotFound, ValidationFailed, field_error, invalid
from . import monitoring, providers
from .views import Row, all_counts, iso, provider_view

log = logging.getLogger(__name__)


def create(c: Container, tenant: str, body: Any) -> Row:
    q = parse(QueueIn, body)
    check_workers(c, q.workers)
    new_rows: list[Row] = []
    links: list[Row] = []
    for i, p in enumerate(q.providers):
        if isinstance(p, ProviderRef):
            links.append({"provider_id": providers.checked_id(p.provider_id, "provider"), "weight": p.weight})
        else:
            providers.check_endpoint(c, p.config.endpoint, f"providers.{i}.config.endpoint")
            row = providers.provider_row(p)
            new_rows.append(row)
            links.append({"provider_id": row["id"], "weight": 1.0})
    if len({link["provider_id"] for link in links}) != len(links):
        raise ValidationFailed("providers: the same provider is listed twice.")
    created = {r["id"] for r in new_rows}
    c.store.require_providers(tenant, [lk["provider_id"] for lk in links if lk["provider_id"] not in created])
    if c.store.queue_exists(tenant, q.queue_id):
        raise Conflict(f"Queue {q.queue_id} already exists.")
    names = c.names(tenant, q.queue_id)
    c.broker.declare(names, q.workers)
    c.store.create_queue(tenant, q.queue_id, new_rows, links, q.workers)
    scale(c, names.main, names.shards(q.workers))
    return get(c, tenant, q.queue_id)


def check_workers(c: Container, workers: int) -> None:
    if workers > c.settings.max_workers:
        detail = f"at most {c.settings.max_workers} (MAX_WORKERS)"
        raise invalid([field_error(["workers"], detail)])


def scale(c: Container, main: str, shards: list[str]) -> None:
    """In the cloud, one event source mapping of the worker per shard in use; locally the
    bridge reads `workers` from the database, so there is nothing to do."""
    if c.mappings is not None:
        c.mappings.sync(main, shards)


def update(c: Container, tenant: str, queue_id: str, body: Any) -> Row:
    """`PATCH /queue/{queue_id}`: its `workers`. New shards are declared before they are used;
    shards no longer used stay until the queue is deleted, and are still read by the others."""
    patch = parse(QueuePatch, body)
    check_workers(c, patch.workers)
    names = c.names(tenant, queue_id)
    current = c.store.queue_workers(tenant, queue_id)
    if not current:
        raise NotFound(f"No queue {queue_id}.")
    c.broker.declare(names, max(patch.workers, current[0]["shards"]))
    c.store.set_workers(tenant, queue_id, patch.workers)
    scale(c, names.main, names.shards(patch.workers))
    return get(c, tenant, queue_id)


def get(c: Container, tenant: str, queue_id: str) -> Row:
    queue = c.store.get_queue(tenant, queue_id)
    return {
        "queue_id": queue["queue_id"],
        "created_at": iso(queue["created_at"]),
        "providers": [provider_view(r, w) for r, w in c.store.queue_providers(tenant, queue_id)],
        "counts": all_counts(queue["counts"]),
        "workers": queue["workers"],
        "worker_state": monitoring.queue_workers(c, tenant, queue_id, queue["workers"], queue["shards"])[
            "worker_state"
        ],
    }


def list_all(c: Container, tenant: str) -> Row:
    return {
        "queues": [
            {"queue_id": r["queue_id"], "created_at": iso(r["created_at"]), "provider_ids": r["provider_ids"]}
            for r in c.store.list_queues(tenant)
        ]
    }


def delete(c: Container, tenant: str, queue_id: str) -> Row:
    current = c.store.queue_workers(tenant, queue_id)
    batches = c.store.delete_queue(tenant, queue_id)
    names = c.names(tenant, queue_id)
    if c.mappings is not None:
        c.mappings.remove(names.main)
    try:
        c.broker.delete(names, current[0]["shards"] if current else 1)
    except AppError as exc:
        log.warning("queue %s deleted but its broker queue was not: %s", queue_id, exc.detail)
    for batch_id in batches:
        c.store.finish_batch_if_done(batch_id)
    return {"queue_id": queue_id, "deleted": True}
