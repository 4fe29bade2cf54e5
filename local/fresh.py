"""Empty state for a test or benchmark run: the database exists, is migrated and empty, and
the limiter's Redis database is flushed."""

from __future__ import annotations

import redis
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.migrate import ensure_database, migrate

TABLES = (
    "idempotency_keys, webhook_deliveries, webhook_endpoints, messages, batches, queue_providers, "
    "queues, providers"
)


def fresh_state(c: Container) -> Container:
    ensure_database(c.settings.database_url)
    migrate(c.settings.database_url)
    with c.db.tx() as cur:
        cur.execute(f"TRUNCATE {TABLES}")
    redis.Redis.from_url(c.settings.redis_url).flushdb()
    return c


def drop_broker_queues(c: Container) -> None:
    """Delete every queue's broker queues (all its shards, its delay and dead-letter queues)."""
    for q in c.store.queue_workers():
        c.broker.delete(c.names(q["tenant_id"], q["queue_id"]), q["shards"])
