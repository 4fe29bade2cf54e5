"""Postgres: a thread-safe connection pool and the store every service writes through."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras

from ..domain.decisions import NO_OUTCOME
from ..domain.models import ChatRequest, ClaimedMessage, Provider, ProviderResult, ProviderType
from ..errors import Conflict, DependencyUnavailable, NotFound
from . import secrets_box

log = logging.getLogger(__name__)
Row = dict[str, Any]
Cursor = Any  # a RealDictCursor

PROVIDER_COLUMNS = (
    "id, name, provider_type, api_key, request_limit, time_window, token_limit, "
    "max_concurrency, config, status, status_detail, created_at, updated_at"
)


CLAIMED = "id::text, tenant_id, queue_id, batch_id::text, request, attempt, tries, last_error"
RELAY_AFTER_S = 60.0  # as migration 0008's default: longer than an API function runs
DELIVERY_KEY = ("endpoint_id", "id", "event")  # a delivery's row: its endpoint, batch and event
ENDPOINT_COLUMNS = "id::text, url, description, enabled, disabled_reason, created_at, updated_at"


def _fail_waiting(cur: Any, endpoint_id: str, reason: str | None) -> None:
    cur.execute(
        """UPDATE webhook_deliveries SET status = 'failed', last_error = %s
           WHERE endpoint_id = %s AND status = 'pending'""",
        (reason, endpoint_id),
    )


class KeyTaken(Exception):
    """An idempotency key another submission has already committed."""


STATEMENT_TIMEOUT_S = 30.0  # no statement runs longer (a 100,000-row COPY takes a few seconds)
PRE_PING_AFTER_S = 10.0  # a connection idle this long is tried before it is used


class Database:
    """A blocking pool of at most `maxconn` connections, opened as needed and kept open (so a
    busy worker does not pay a new Postgres backend per transaction); `tx()` is one
    transaction. A connection that broke is dropped, and the error says Postgres is down.

    Every call has a deadline: 5 s to connect, `statement_timeout_s` per statement, and TCP
    keepalives that find a dead server within about a minute. A connection that has sat idle
    (across a Postgres restart, or a Lambda environment frozen between invocations) is tried
    with a `SELECT 1` before it is handed out, and replaced if it has gone."""

    def __init__(self, url: str, maxconn: int = 16, statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
        self.url = url
        self.maxconn = maxconn
        self.statement_timeout_ms = round(statement_timeout_s * 1000)
        self._idle: queue.LifoQueue[tuple[Any, float]] = queue.LifoQueue()  # (connection, idle since)
        self._slots = threading.BoundedSemaphore(maxconn)

    def _connect(self) -> Any:
        try:
            return psycopg2.connect(
                self.url,
                connect_timeout=5,
                cursor_factory=psycopg2.extras.RealDictCursor,
                options=f"-c statement_timeout={self.statement_timeout_ms}",
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
            )
        except psycopg2.OperationalError as exc:
            raise DependencyUnavailable(f"postgres unreachable: {exc}".strip()) from exc

    def _take(self) -> Any:
        if not self._slots.acquire(timeout=30):
            raise DependencyUnavailable("postgres: no connection free for 30 s")
        try:
            while True:
                try:
                    conn, since = self._idle.get_nowait()
                except queue.Empty:
                    break
                if time.monotonic() - since < PRE_PING_AFTER_S or _alive(conn):
                    return conn
            return self._connect()
        except BaseException:
            self._slots.release()
            raise

    def _give_back(self, conn: Any, broken: bool) -> None:
        if broken or conn.closed:
            with contextlib.suppress(psycopg2.Error):
                conn.close()
        else:
            self._idle.put((conn, time.monotonic()))
        self._slots.release()

    @contextmanager
    def tx(self) -> Iterator[Any]:
        conn = self._take()
        broken = False
        try:
            with conn.cursor() as cur:
                yield cur
            conn.commit()
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            broken = True
            raise DependencyUnavailable(f"postgres: {exc}".strip()) from exc
        except BaseException:
            if not conn.closed:
                conn.rollback()
            raise
        finally:
            self._give_back(conn, broken)

    def ping(self) -> None:
        with self.tx() as cur:
            cur.execute("SELECT 1")

    def close(self) -> None:
        while True:
            try:
                conn, _ = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(psycopg2.Error):
                conn.close()


def _alive(conn: Any) -> bool:
    """Whether a pooled connection still answers; one that does not is closed."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.rollback()
        return True
    except psycopg2.Error:
        with contextlib.suppress(psycopg2.Error):
            conn.close()
        return False


def copy_rows(tenant: str, rows: Sequence[Row]) -> io.StringIO:
    """Message rows as CSV for COPY: an empty unquoted field is NULL."""
    out = io.StringIO()
    writer = csv.writer(out)
    for r in rows:
        metadata = None if r["metadata"] is None else json.dumps(r["metadata"])
        writer.writerow(
            (
                tenant,
                r["id"],
                r["queue_id"],
                r["batch_id"],
                r["seq"],
                r["custom_id"],
                json.dumps(r["request"]),
                metadata,
            )
        )
    out.seek(0)
    return out


def stored_api_key(row: Row) -> str:
    """The one place a stored provider key is read: opened from its sealed form
    (`secrets_box.KeyUnreadable`, a 503, if no configured data key opens it). A key stored
    before keys were encrypted is read as it is: Postgres takes no new ones, and every
    process seals them as it starts."""
    stored = str(row["api_key"])
    if not secrets_box.is_sealed(stored):
        return stored
    return secrets_box.current().open(str(row["id"]), stored)


def provider_from_row(row: Row, weight: float = 1.0) -> Provider:
    return Provider(
        id=str(row["id"]),
        name=row["name"],
        type=ProviderType(row["provider_type"]),
        api_key=stored_api_key(row),
        limit=row["request_limit"],
        time_window=row["time_window"],
        token_limit=row["token_limit"],
        max_concurrency=row["max_concurrency"],
        config=dict(row["config"] or {}),
        status=row["status"],
        version=str(row["updated_at"]),
        weight=weight,
    )


class GroupCommit:
    """Writes that arrive together share one transaction: the first caller writes what is
    waiting (its own included) while the others wait for it, then the next one waiting writes
    what came meanwhile. With hundreds of calls answering at once, one transaction a moment
    instead of one per answer. A group that fails for another reason than an unreachable
    Postgres (a bad row, a deadlock) is written again one row at a time, so one bad row fails
    only itself and a deadlock sends no paid answer back to be asked again."""

    def __init__(self, write: Callable[[Sequence[Any]], list[Any]], most: int = 200) -> None:
        self._write, self.most = write, most
        self._cond = threading.Condition()
        self._waiting: list[_Pending] = []
        self._writing = False

    def write(self, row: Any) -> Any:
        mine = _Pending(row)
        with self._cond:
            self._waiting.append(mine)
            while not mine.done and self._writing:
                self._cond.wait()
            if mine.done:
                return mine.outcome()
            self._writing = True
            # Its own row first: the writer does not return before its own row is written.
            others = [p for p in self._waiting if p is not mine]
            group, self._waiting = [mine, *others[: self.most - 1]], others[self.most - 1 :]
        try:
            self._settle(group)
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
        return mine.outcome()

    def _settle(self, group: list[_Pending]) -> None:
        try:
            for p, value in zip(group, self._write([p.row for p in group]), strict=True):
                p.value = value
        except DependencyUnavailable as exc:
            if isinstance(exc.__cause__, psycopg2.errors.TransactionRollbackError) and len(group) > 1:
                for p in group:  # a deadlock or serialization failure: no row of it was written
                    self._settle([p])
            else:
                for p in group:
                    p.error = exc
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
            else:
                for p in group:
                    self._settle([p])
        for p in group:
            p.done = True


class _Pending:
    __slots__ = ("done", "error", "row", "value")

    def __init__(self, row: Any) -> None:
        self.row, self.done, self.value = row, False, None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class Store:
    """Every query the services need, each scoped to a tenant."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._completions = GroupCommit(self._complete_rows)

    # -- tenants and their API keys ---------------------------------------------------------

    def create_tenant(self, tenant_id: str, name: str) -> Row:
        with self.db.tx() as cur:
            cur.execute(
                """INSERT INTO tenants (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING
                   RETURNING id AS tenant_id, name, created_at""",
                (tenant_id, name),
            )
            row = cur.fetchone()
        if row is None:
            raise Conflict(f"Tenant {tenant_id!r} already exists.")
        return dict(row)

    def ensure_tenant(self, tenant_id: str) -> None:
        with self.db.tx() as cur:
            cur.execute("INSERT INTO tenants (id) VALUES (%s) ON CONFLICT DO NOTHING", (tenant_id,))

    def list_tenants(self) -> list[Row]:
        with self.db.tx() as cur:
            cur.execute(
                """SELECT t.id AS tenant_id, t.name, t.created_at,
                          coalesce(json_agg(json_build_object(
                              'key_id', k.id, 'prefix', k.prefix, 'created_at', k.created_at,
                              'revoked_at', k.revoked_at) ORDER BY k.created_at)
                              FILTER (WHERE k.id IS NOT NULL), '[]') AS keys
                   FROM tenants t LEFT JOIN api_keys k ON k.tenant_id = t.id
                   GROUP BY t.id ORDER BY t.created_at, t.id"""
            )
            return [dict(r) for r in cur.fetchall()]

    def add_api_key(self, tenant_id: str, key_id: str, key_hash: bytes, prefix: str, replace: bool) -> Row:
        """A new key for the tenant; with `replace`, its other keys are revoked in the same
        transaction."""
        with self.db.tx() as cur:
            cur.execute("SELECT 1 FROM tenants WHERE id = %s FOR UPDATE", (tenant_id,))
            if cur.fetchone() is None:
                raise NotFound(f"Tenant {tenant_id!r} not found.")
            if replace:
                cur.execute(
                    "UPDATE api_keys SET revoked_at = now() WHERE tenant_id = %s AND revoked_at IS NULL",
                    (tenant_id,),
                )
            cur.execute(
                """INSERT INTO api_keys (id, tenant_id, key_hash, prefix) VALUES (%s, %s, %s, %s)
                   RETURNING id::text AS key_id, tenant_id, prefix, created_at""",
                (key_id, tenant_id, psycopg2.Binary(key_hash), prefix),
            )
            return dict(cur.fetchone())

    def revoke_api_key(self, tenant_id: str, key_id: str) -> bool:
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
                   WHERE tenant_id = %s AND id = %s""",
                (tenant_id, key_id),
            )
            return cur.rowcount == 1

    def tenant_of_key(self, key_hash: bytes) -> str | None:
        """The tenant whose live key has this hash."""
        with self.db.tx() as cur:
            cur.execute(
                "SELECT tenant_id FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
                (psycopg2.Binary(key_hash),),
            )
            row = cur.fetchone()
        return None if row is None else str(row["tenant_id"])

    # -- providers --------------------------------------------------------------------------

    @staticmethod
    def _insert_provider(cur: Cursor, tenant: str, row: Row) -> Row:
        """The provider's key is stored sealed, never as given."""
        sealed = secrets_box.current().seal(str(row["id"]), row["api_key"])
        cur.execute(
            f"""INSERT INTO providers (tenant_id, id, name, provider_type, api_key, request_limit,
                   time_window, token_limit, max_concurrency, config)
                VALUES (%(tenant)s, %(id)s, %(name)s, %(provider_type)s, %(api_key)s, %(limit)s,
                   %(time_window)s, %(token_limit)s, %(max_concurrency)s, %(config)s)
                RETURNING {PROVIDER_COLUMNS}""",
            {**row, "api_key": sealed, "tenant": tenant, "config": psycopg2.extras.Json(row["config"])},
        )
        return dict(cur.fetchone())

    def create_provider(self, tenant: str, row: Row) -> Row:
        with self.db.tx() as cur:
            return self._insert_provider(cur, tenant, row)

    def list_providers(self, tenant: str) -> list[Row]:
        with self.db.tx() as cur:
            cur.execute(
                f"SELECT {PROVIDER_COLUMNS} FROM providers WHERE tenant_id = %s ORDER BY created_at",
                (tenant,),
            )
            return [dict(r) for r in cur.fetchall()]

    def get_provider(self, tenant: str, provider_id: str) -> Row:
        with self.db.tx() as cur:
            cur.execute(
                f"SELECT {PROVIDER_COLUMNS} FROM providers WHERE tenant_id = %s AND id = %s",
                (tenant, provider_id),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"No provider {provider_id}.")
        return dict(row)

    def update_provider(self, tenant: str, provider_id: str, changes: Row) -> Row:
        if "api_key" in changes:  # stored sealed, never as given
            changes = {**changes, "api_key": secrets_box.current().seal(provider_id, changes["api_key"])}
        sets = ", ".join(f"{col} = %({col})s" for col in changes)
        params = {k: psycopg2.extras.Json(v) if k == "config" else v for k, v in changes.items()}
        with self.db.tx() as cur:
            cur.execute(
                f"""UPDATE providers SET {sets}, updated_at = clock_timestamp()
                    WHERE tenant_id = %(tenant)s AND id = %(id)s RETURNING {PROVIDER_COLUMNS}""",
                {**params, "tenant": tenant, "id": provider_id},
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"No provider {provider_id}.")
        return dict(row)

    def exhausted_providers(self, tenant: str) -> list[Row]:
        with self.db.tx() as cur:
            cur.execute(
                """SELECT id::text AS provider_id, name AS provider_name, status_detail FROM providers
                   WHERE tenant_id = %s AND status = 'quota_exhausted' ORDER BY name""",
                (tenant,),
            )
            return [dict(r) for r in cur.fetchall()]

    def set_provider_status(
        self, provider_id: str, status: str, detail: str | None, version: str | None = None
    ) -> bool:
        """Set the provider's status; with `version` (its `updated_at` as loaded), only if it
        has not been changed since (a new key is not marked for what the old one did)."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE providers SET status = %s, status_detail = %s
                   WHERE id = %s AND (%s::timestamptz IS NULL OR updated_at = %s::timestamptz)""",
                (status, detail, provider_id, version, version),
            )
            return cur.rowcount == 1

    def delete_provider(self, tenant: str, provider_id: str) -> None:
        with self.db.tx() as cur:
            cur.execute(
                "SELECT queue_id FROM queue_providers WHERE tenant_id = %s AND provider_id = %s",
                (tenant, provider_id),
            )
            users = [r["queue_id"] for r in cur.fetchall()]
            if users:
                raise Conflict(
                    f"Provider {provider_id} is used by queue(s) {', '.join(sorted(users))}; "
                    "delete those queues first."
                )
            cur.execute("DELETE FROM providers WHERE tenant_id = %s AND id = %s", (tenant, provider_id))
            if cur.rowcount == 0:
                raise NotFound(f"No provider {provider_id}.")

    # -- queues -----------------------------------------------------------------------------

    def create_queue(
        self,
        tenant: str,
        queue_id: str,
        new_providers: Sequence[Row],
        links: Sequence[Row],
        workers: int = 1,
    ) -> None:
        """One transaction: the queue, its inline providers, and its links (id, weight, position)."""
        with self.db.tx() as cur:
            cur.execute(
                """INSERT INTO queues (tenant_id, queue_id, workers, shards) VALUES (%s, %s, %s, %s)
                   ON CONFLICT DO NOTHING""",
                (tenant, queue_id, workers, workers),
            )
            if cur.rowcount == 0:
                raise Conflict(f"Queue {queue_id} already exists.")
            for row in new_providers:
                self._insert_provider(cur, tenant, row)
            self._require_providers(cur, tenant, [link["provider_id"] for link in links])
            psycopg2.extras.execute_values(
                cur,
                """INSERT INTO queue_providers (tenant_id, queue_id, provider_id, position, weight)
                   VALUES %s""",
                [(tenant, queue_id, link["provider_id"], i, link["weight"]) for i, link in enumerate(links)],
            )

    @staticmethod
    def _require_providers(cur: Cursor, tenant: str, ids: Sequence[str]) -> None:
        cur.execute(
            "SELECT id::text FROM providers WHERE tenant_id = %s AND id = ANY(%s::uuid[])",
            (tenant, list(ids)),
        )
        missing = set(ids) - {r["id"] for r in cur.fetchall()}
        if missing:
            raise NotFound(f"No provider {', '.join(sorted(missing))}.")

    def require_providers(self, tenant: str, ids: Sequence[str]) -> None:
        """NotFound naming every id in `ids` that is not one of the tenant's providers."""
        with self.db.tx() as cur:
            self._require_providers(cur, tenant, ids)

    def queue_exists(self, tenant: str, queue_id: str) -> bool:
        with self.db.tx() as cur:
            cur.execute("SELECT 1 FROM queues WHERE tenant_id = %s AND queue_id = %s", (tenant, queue_id))
            return cur.fetchone() is not None

    def list_queues(self, tenant: str) -> list[Row]:
        with self.db.tx() as cur:
            cur.execute(
                """SELECT q.queue_id, q.created_at,
                          coalesce(array_agg(qp.provider_id::text ORDER BY qp.position)
                                   FILTER (WHERE qp.provider_id IS NOT NULL), '{}') AS provider_ids
                   FROM queues q LEFT JOIN queue_providers qp
                        ON qp.tenant_id = q.tenant_id AND qp.queue_id = q.queue_id
                   WHERE q.tenant_id = %s GROUP BY q.queue_id, q.created_at
                   ORDER BY q.created_at""",
                (tenant,),
            )
            return [dict(r) for r in cur.fetchall()]

    def get_queue(self, tenant: str, queue_id: str) -> Row:
        with self.db.tx() as cur:
            cur.execute(
                """SELECT queue_id, created_at, workers, shards FROM queues
                   WHERE tenant_id = %s AND queue_id = %s""",
                (tenant, queue_id),
            )
            queue = cur.fetchone()
            if queue is None:
                raise NotFound(f"No queue {queue_id}.")
            cur.execute(
                """SELECT status, count(*) AS n FROM messages
                   WHERE tenant_id = %s AND queue_id = %s GROUP BY status""",
                (tenant, queue_id),
            )
            counts = {r["status"]: r["n"] for r in cur.fetchall()}
        return {**queue, "counts": counts}

    def queue_providers(self, tenant: str, queue_id: str) -> list[tuple[Row, float]]:
        cols = ", ".join(f"p.{c.strip()}" for c in PROVIDER_COLUMNS.split(","))
        with self.db.tx() as cur:
            cur.execute(
                f"""SELECT {cols}, qp.weight FROM queue_providers qp
                    JOIN providers p ON p.id = qp.provider_id AND p.tenant_id = qp.tenant_id
                    WHERE qp.tenant_id = %s AND qp.queue_id = %s ORDER BY qp.position""",
                (tenant, queue_id),
            )
            return [(dict(r), r["weight"]) for r in cur.fetchall()]

    def delete_queue(self, tenant: str, queue_id: str) -> list[str]:
        """Remove the queue and cancel its queued messages; returns the batches touched."""
        with self.db.tx() as cur:
            cur.execute("DELETE FROM queues WHERE tenant_id = %s AND queue_id = %s", (tenant, queue_id))
            if cur.rowcount == 0:
                raise NotFound(f"No queue {queue_id}.")
            cur.execute(
                """UPDATE messages SET status = 'cancelled', finished_at = now(), updated_at = now(),
                          last_error = 'queue deleted'
                   WHERE tenant_id = %s AND queue_id = %s AND status = 'queued'
                   RETURNING batch_id""",
                (tenant, queue_id),
            )
            return sorted({str(r["batch_id"]) for r in cur.fetchall() if r["batch_id"]})

    def all_queues(self) -> list[tuple[str, str]]:
        return [(r["tenant_id"], r["queue_id"]) for r in self.queue_workers()]

    def queue_workers(self, tenant: str | None = None, queue_id: str | None = None) -> list[Row]:
        """Every queue's (or one's) `workers` and `shards`."""
        with self.db.tx() as cur:
            cur.execute(
                """SELECT tenant_id, queue_id, workers, shards FROM queues
                   WHERE (%(t)s::text IS NULL OR tenant_id = %(t)s)
                     AND (%(q)s::text IS NULL OR queue_id = %(q)s)
                   ORDER BY created_at""",
                {"t": tenant, "q": queue_id},
            )
            return [dict(r) for r in cur.fetchall()]

    def set_workers(self, tenant: str, queue_id: str, workers: int) -> Row:
        """Set `workers`; `shards` grows with it and never shrinks. NotFound if no such queue."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE queues SET workers = %s, shards = greatest(shards, %s)
                   WHERE tenant_id = %s AND queue_id = %s
                   RETURNING tenant_id, queue_id, workers, shards""",
                (workers, workers, tenant, queue_id),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"No queue {queue_id}.")
        return dict(row)

    # -- messages ---------------------------------------------------------------------------

    def insert_messages(
        self, tenant: str, batch: Row | None, rows: Sequence[Row], key: Row | None = None
    ) -> None:
        """One transaction: the batch (if any) and all its messages, or nothing; with `key`
        (`key`, `body_hash`, `answer`, `ttl_s`), its idempotency key too, first: a key already
        taken (and not expired) raises KeyTaken, and nothing is written."""
        with self.db.tx() as cur:
            if key is not None:
                cur.execute(
                    """DELETE FROM idempotency_keys WHERE tenant_id = %(tenant)s AND key = %(key)s
                       AND created_at < now() - make_interval(secs => %(ttl_s)s)""",
                    {**key, "tenant": tenant},
                )
                cur.execute(
                    """INSERT INTO idempotency_keys (tenant_id, key, body_hash, answer)
                       VALUES (%(tenant)s, %(key)s, %(body_hash)s, %(answer)s) ON CONFLICT DO NOTHING""",
                    {**key, "tenant": tenant},
                )
                if cur.rowcount == 0:
                    raise KeyTaken(key["key"])
            if batch is not None:
                cur.execute(
                    """INSERT INTO batches (tenant_id, id, queue_id, total, webhook_url,
                           webhook_event, webhook_secret)
                       VALUES (%(tenant)s, %(id)s, %(queue_id)s, %(total)s, %(webhook_url)s,
                           %(webhook_event)s, %(webhook_secret)s)""",
                    {"webhook_secret": None, **batch, "tenant": tenant},
                )
            cur.copy_expert(
                """COPY messages (tenant_id, id, queue_id, batch_id, seq, custom_id, request, metadata)
                   FROM STDIN WITH (FORMAT csv)""",
                copy_rows(tenant, rows),
            )
            if batch is None:  # a batch's messages are relayed with their batch (its relay_after)
                cur.execute(
                    """UPDATE messages SET relay_after = now() + make_interval(secs => %s)
                       WHERE id = ANY(%s::uuid[])""",
                    (RELAY_AFTER_S, [r["id"] for r in rows]),
                )

    def idempotent_answer(self, tenant: str, key: str, ttl_s: float) -> Row | None:
        """The first answer to `key` (`body_hash`, sealed `answer`), unless it has expired."""
        with self.db.tx() as cur:
            cur.execute(
                """SELECT body_hash, answer FROM idempotency_keys
                   WHERE tenant_id = %s AND key = %s AND created_at >= now() - make_interval(secs => %s)""",
                (tenant, key, ttl_s),
            )
            row = cur.fetchone()
        return None if row is None else {"body_hash": bytes(row["body_hash"]), "answer": row["answer"]}

    def forget_idempotency_keys(self, ttl_s: float) -> int:
        with self.db.tx() as cur:
            cur.execute(
                "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => %s)", (ttl_s,)
            )
            return int(cur.rowcount)

    def published(self, ids: Sequence[str]) -> None:
        """The broker has confirmed these messages: nothing left to relay."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE messages SET relay_after = NULL
                   WHERE id = ANY(%s::uuid[]) AND relay_after IS NOT NULL""",
                (list(ids),),
            )

    def batch_published(self, batch_id: str) -> None:
        """Every shard of the batch's first publish is confirmed: nothing left to relay."""
        with self.db.tx() as cur:
            cur.execute(
                "UPDATE batches SET relay_after = NULL WHERE id = %s AND relay_after IS NOT NULL", (batch_id,)
            )

    def batches_to_relay(self, limit: int) -> list[Row]:
        """Batches whose first publish was not confirmed in time, each with its queued messages."""
        with self.db.tx() as cur:
            cur.execute(
                """SELECT tenant_id, queue_id, id::text FROM batches WHERE relay_after < now()
                   ORDER BY relay_after LIMIT %s""",
                (limit,),
            )
            batches = [dict(r) for r in cur.fetchall()]
            for b in batches:
                cur.execute(
                    "SELECT id::text FROM messages WHERE batch_id = %s AND status = 'queued' ORDER BY seq",
                    (b["id"],),
                )
                b["messages"] = [r["id"] for r in cur.fetchall()]
            return batches

    def to_relay(self, limit: int) -> list[Row]:
        """Queued messages committed and not confirmed by the broker in time, oldest first.
        Those no longer queued (a copy did reach a worker; cancelled) have nothing to relay."""
        with self.db.tx() as cur:
            cur.execute(
                "UPDATE messages SET relay_after = NULL WHERE relay_after < now() AND status <> 'queued'"
            )
            cur.execute(
                """SELECT tenant_id, queue_id, id::text FROM messages
                   WHERE relay_after < now() AND status = 'queued'
                   ORDER BY relay_after, seq LIMIT %s""",
                (limit,),
            )
            return [dict(r) for r in cur.fetchall()]

    def get_message(self, tenant: str, message_id: str) -> Row:
        with self.db.tx() as cur:
            cur.execute("SELECT * FROM messages WHERE tenant_id = %s AND id = %s", (tenant, message_id))
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"No message {message_id}.")
        return dict(row)

    def cancel_message(self, tenant: str, message_id: str) -> Row | None:
        """Cancel a queued message; None when it was not queued."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE messages SET status = 'cancelled', finished_at = now(), updated_at = now()
                   WHERE tenant_id = %s AND id = %s AND status = 'queued' RETURNING *""",
                (tenant, message_id),
            )
            row = cur.fetchone()
        return None if row is None else dict(row)

    def delete_message(self, tenant: str, message_id: str) -> bool:
        """Delete a finished message that is not part of a batch."""
        with self.db.tx() as cur:
            cur.execute(
                """DELETE FROM messages WHERE tenant_id = %s AND id = %s AND batch_id IS NULL
                   AND status IN ('completed', 'failed', 'cancelled')""",
                (tenant, message_id),
            )
            return cur.rowcount == 1

    def claim(self, ids: Sequence[str], lease_s: float, token: str | None = None) -> list[ClaimedMessage]:
        """Take the lease on every message that is queued (or whose lease ran out). A lease that
        ran out counts as a try: the attempt that held it ended without an outcome (its worker
        died or stalled), so a message that kills its worker runs out of tries too.

        `token` names the claim: tried again with the same token (its first try may have
        committed with its reply lost), it also returns what that try took, as it took it."""
        if not ids:
            return []
        with self.db.tx() as cur:
            cur.execute(
                f"""WITH again AS (
                       UPDATE messages SET lease_until = now() + make_interval(secs => %(lease_s)s),
                              updated_at = now()
                       WHERE id = ANY(%(ids)s::uuid[]) AND status = 'processing'
                         AND claim_token = %(token)s
                       RETURNING {CLAIMED}
                   ), taken AS (
                       UPDATE messages SET status = 'processing', attempt = attempt + 1,
                              tries = tries + (status = 'processing')::int,
                              lease_until = now() + make_interval(secs => %(lease_s)s),
                              started_at = coalesce(started_at, now()), updated_at = now(),
                              claim_token = %(token)s
                       WHERE id = ANY(%(ids)s::uuid[])
                         AND (status = 'queued'
                              OR (status = 'processing' AND lease_until < now()
                                  AND claim_token IS DISTINCT FROM %(token)s))
                       RETURNING {CLAIMED}
                   )
                   SELECT * FROM again UNION ALL SELECT * FROM taken""",
                {"lease_s": lease_s, "ids": list(ids), "token": token or str(uuid.uuid4())},
            )
            rows = cur.fetchall()
        return [
            ClaimedMessage(
                id=r["id"],
                tenant_id=r["tenant_id"],
                queue_id=r["queue_id"],
                batch_id=r["batch_id"],
                request=ChatRequest.from_json(r["request"]),
                attempt=r["attempt"],
                tries=r["tries"],
                last_error=r["last_error"],
            )
            for r in rows
        ]

    def held_elsewhere(self, ids: Sequence[str]) -> list[Row]:
        """Of `ids`, those another worker holds, with the seconds its lease has left (0 for one
        that ran out since the claim missed it: it comes back at once)."""
        if not ids:
            return []
        with self.db.tx() as cur:
            cur.execute(
                """SELECT id::text, tenant_id, queue_id,
                          greatest(extract(epoch FROM lease_until - now()), 0)::float AS lease_left_s
                   FROM messages WHERE id = ANY(%s::uuid[]) AND status = 'processing'""",
                (list(ids),),
            )
            return [dict(r) for r in cur.fetchall()]

    def renew(self, msg: ClaimedMessage, lease_s: float, counted: bool, error: str) -> ClaimedMessage | None:
        """After a failed call that will be retried: a new fencing number, a longer lease, the
        try counted (unless it was a rate-limit 429). None if the lease was lost."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE messages SET attempt = attempt + 1, tries = tries + %s, updated_at = now(),
                          lease_until = now() + make_interval(secs => %s), last_error = %s
                   WHERE id = %s AND attempt = %s AND status = 'processing'
                   RETURNING attempt, tries""",
                (int(counted), lease_s, error[:4000], msg.id, msg.attempt),
            )
            row = cur.fetchone()
        if row is None:
            return None
        return replace(msg, attempt=row["attempt"], tries=row["tries"])

    def extend_leases(self, ids: Sequence[str], lease_s: float) -> None:
        """The invocation working on these messages is alive: their leases run `lease_s` on."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE messages SET lease_until = greatest(lease_until, now() + make_interval(secs => %s))
                   WHERE id = ANY(%s::uuid[]) AND status = 'processing'""",
                (lease_s, list(ids)),
            )

    def complete(self, msg: ClaimedMessage, provider: Provider, result: ProviderResult) -> bool:
        """Store an answer; whether the message was still this attempt's. Answers stored at the
        same moment share one transaction (`GroupCommit`)."""
        row = (
            msg.id,
            msg.attempt,
            provider.id,
            provider.name,
            result.model,
            result.text,
            psycopg2.extras.Json(result.raw),
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            result.latency_ms,
        )
        return self._completions.write(row)

    def _complete_rows(self, rows: Sequence[tuple[Any, ...]]) -> list[bool]:
        with self.db.tx() as cur:
            stored = psycopg2.extras.execute_values(
                cur,
                """UPDATE messages m SET status = 'completed', lease_until = NULL,
                          tries = m.tries + 1, provider_id = v.provider_id,
                          provider_name = v.provider_name, model = v.model,
                          response_text = v.response_text, response_raw = v.response_raw,
                          prompt_tokens = v.prompt_tokens, completion_tokens = v.completion_tokens,
                          latency_ms = v.latency_ms, last_error = NULL, finished_at = now(),
                          updated_at = now()
                   FROM (VALUES %s) AS v (id, attempt, provider_id, provider_name, model,
                        response_text, response_raw, prompt_tokens, completion_tokens, latency_ms)
                   WHERE m.id = v.id AND m.attempt = v.attempt AND m.status = 'processing'
                   RETURNING m.id::text""",
                rows,
                template="(%s::uuid, %s::int, %s::uuid, %s, %s, %s, %s::jsonb, %s::int, %s::int, %s::int)",
                page_size=len(rows),
                fetch=True,
            )
        done = {r["id"] for r in stored}
        return [str(r[0]) in done for r in rows]

    def fail(
        self,
        msg: ClaimedMessage,
        error: str,
        provider: Provider | None,
        counted: bool = True,
        dead_letter: bool = False,
    ) -> bool:
        """Fail the message for good; `dead_letter`: because it used up its tries."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE messages SET status = 'failed', lease_until = NULL, last_error = %s,
                          tries = tries + %s,
                          provider_id = coalesce(%s, provider_id),
                          provider_name = coalesce(%s, provider_name),
                          dead_lettered_at = CASE WHEN %s THEN now() END,
                          finished_at = now(), updated_at = now()
                   WHERE id = %s AND attempt = %s AND status = 'processing'""",
                (
                    error[:4000],
                    int(counted),
                    provider and provider.id,
                    provider and provider.name,
                    dead_letter,
                    msg.id,
                    msg.attempt,
                ),
            )
            return cur.rowcount == 1

    def requeue_or_dead_letter(
        self, max_attempts: int, ids: Sequence[str] | None = None, grace_s: float = 0.0
    ) -> list[Row]:
        """Messages that lost every copy on the broker, each counted as a try: those `ids`
        the broker dead-lettered (delivered too often without an outcome) that are still to
        do, or, without `ids`, those whose lease ran out more than `grace_s` ago. With tries
        left a message is queued for the relay to publish at once; without, it is failed and
        dead-lettered. Each (`id`, `tenant_id`, `queue_id`, `spent`: dead-lettered,
        `last_error`)."""
        where = (
            "id = ANY(%(ids)s::uuid[])"
            " AND (status = 'queued' OR (status = 'processing' AND lease_until < now()))"
            if ids is not None
            else "status = 'processing' AND lease_until < now() - make_interval(secs => %(grace_s)s)"
        )
        with self.db.tx() as cur:
            cur.execute(
                f"""WITH due AS (
                        SELECT id, tries + 1 >= %(max)s AS spent FROM messages WHERE {where}
                        ORDER BY id FOR UPDATE SKIP LOCKED)
                    UPDATE messages m SET
                        tries = m.tries + 1, lease_until = NULL, updated_at = now(),
                        status = CASE WHEN due.spent THEN 'failed' ELSE 'queued' END,
                        relay_after = CASE WHEN due.spent THEN NULL ELSE now() END,
                        dead_lettered_at = CASE WHEN due.spent THEN now() END,
                        finished_at = CASE WHEN due.spent THEN now() END,
                        last_error = CASE WHEN due.spent
                            THEN left(format('gave up after %%s attempts: %%s', m.tries + 1,
                                 coalesce(m.last_error, %(no_outcome)s)), 4000)
                            ELSE m.last_error END
                    FROM due WHERE m.id = due.id
                    RETURNING m.id::text, m.tenant_id, m.queue_id, due.spent, m.last_error""",
                {
                    "max": max_attempts,
                    "ids": None if ids is None else list(ids),
                    "grace_s": grace_s,
                    "no_outcome": NO_OUTCOME,
                },
            )
            return [dict(r) for r in cur.fetchall()]

    def release(self, msg: ClaimedMessage, note: str | None = None) -> bool:
        """Give the message back to the queue (deferred work), keeping its attempt count. Its
        copy on the broker is to come (`published` says when it has): until then it is the
        relay's, as a new message is. One whose batch was cancelled meanwhile is cancelled.
        Released already under this attempt and not yet published (the reply to that release
        was lost), it is released again: its copy is still to be published."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE messages m SET status = 'queued', lease_until = NULL, updated_at = now(),
                          last_error = coalesce(%s, last_error),
                          relay_after = now() + make_interval(secs => %s)
                   WHERE id = %s AND attempt = %s
                     AND (status = 'processing' OR (status = 'queued' AND relay_after IS NOT NULL))
                   RETURNING batch_id""",
                (note, RELAY_AFTER_S, msg.id, msg.attempt),
            )
            row = cur.fetchone()
            if row is not None and row["batch_id"] is not None:
                cur.execute(
                    """UPDATE messages SET status = 'cancelled', relay_after = NULL, finished_at = now()
                       WHERE id = %s AND EXISTS (SELECT 1 FROM batches
                                                 WHERE id = %s AND cancelled_at IS NOT NULL)""",
                    (msg.id, row["batch_id"]),
                )
            return row is not None

    # -- batches ----------------------------------------------------------------------------

    def get_batch(self, tenant: str, batch_id: str) -> Row:
        with self.db.tx() as cur:
            cur.execute("SELECT * FROM batches WHERE tenant_id = %s AND id = %s", (tenant, batch_id))
            batch = cur.fetchone()
        if batch is None:
            raise NotFound(f"No batch {batch_id}.")
        return dict(batch)

    def batch_progress(self, tenant: str, batch_id: str) -> Row:
        """The batch with its message counts by status and when its first message started."""
        batch = self.get_batch(tenant, batch_id)
        with self.db.tx() as cur:
            cur.execute("SELECT min(started_at) AS started_at FROM messages WHERE batch_id = %s", (batch_id,))
            started = cur.fetchone()["started_at"]
        return {**batch, "counts": self.batch_counts(batch_id), "started_at": started}

    def batch_page(self, tenant: str, batch_id: str, after_seq: int, limit: int, columns: str) -> list[Row]:
        with self.db.tx() as cur:
            cur.execute(
                f"""SELECT {columns} FROM messages
                    WHERE tenant_id = %s AND batch_id = %s AND seq > %s
                    ORDER BY seq LIMIT %s""",
                (tenant, batch_id, after_seq, limit),
            )
            return [dict(r) for r in cur.fetchall()]

    def finish_batch_if_done(self, batch_id: str) -> bool:
        """Mark the batch finished once no message is pending. Run after the result commits."""
        return self.finish_batches(batch_id) == 1

    def finish_batches(self, batch_id: str | None = None) -> int:
        """Mark finished every unfinished batch (or only `batch_id`) with no message pending,
        in one statement (none waits behind older ones), and make their deliveries to their
        tenants' endpoints in the same transaction: a finished batch never misses one. How
        many were finished."""
        with self.db.tx() as cur:
            cur.execute(
                """WITH done AS (
                       UPDATE batches b SET finished_at = now(), finishes = finishes + 1,
                              webhook_status = CASE WHEN webhook_url IS NULL THEN NULL
                                                    ELSE 'pending' END,
                              webhook_next_at = now(), webhook_last_error = NULL
                       WHERE b.finished_at IS NULL AND (%(batch)s::uuid IS NULL OR b.id = %(batch)s::uuid)
                         AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.batch_id = b.id
                                         AND m.status IN ('queued', 'processing'))
                       RETURNING b.id, b.tenant_id, b.cancelled_at IS NOT NULL AS cancelled),
                   deliveries AS (
                       INSERT INTO webhook_deliveries (endpoint_id, batch_id, event)
                       SELECT e.id, done.id,
                              CASE WHEN done.cancelled THEN 'batch.cancelled' ELSE 'batch.completed' END
                       FROM done JOIN webhook_endpoints e ON e.tenant_id = done.tenant_id AND e.enabled
                       ON CONFLICT (endpoint_id, batch_id, event) DO UPDATE SET
                           status = 'pending', next_at = now(), last_error = NULL)
                   SELECT count(*) AS n FROM done""",
                {"batch": batch_id},
            )
            return int(cur.fetchone()["n"])

    def cancel_batch(self, tenant: str, batch_id: str) -> int:
        """Cancel the batch and its queued messages (those in flight finish, and what is done
        is kept); how many were cancelled. Cancelling a cancelled batch again changes nothing;
        a batch that finished otherwise cannot be cancelled."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE batches SET cancelled_at = coalesce(cancelled_at, now())
                   WHERE tenant_id = %s AND id = %s AND (finished_at IS NULL OR cancelled_at IS NOT NULL)
                   RETURNING id""",
                (tenant, batch_id),
            )
            if cur.fetchone() is None:
                self.get_batch(tenant, batch_id)  # 404 if there is none
                raise Conflict("The batch has finished; there is nothing left to cancel.")
            cur.execute(
                """UPDATE messages SET status = 'cancelled', relay_after = NULL, finished_at = now(),
                          updated_at = now()
                   WHERE batch_id = %s AND status = 'queued'""",
                (batch_id,),
            )
            return int(cur.rowcount)

    def requeue(self, tenant: str, batch_id: str | None = None, message_id: str | None = None) -> list[Row]:
        """Queue again the failed messages of a batch, or one failed or cancelled message, with
        their tries back to none; a finished batch is open again. Their ids and queues, for
        their publish (until which they are the relay's). A cancelled batch stays cancelled."""
        where, params = (
            ("batch_id = %s AND status = 'failed'", (tenant, batch_id))
            if message_id is None
            else ("id = %s AND status IN ('failed', 'cancelled')", (tenant, message_id))
        )
        with self.db.tx() as cur:
            cur.execute(
                f"""SELECT m.id, b.cancelled_at IS NOT NULL AS cancelled FROM messages m
                    LEFT JOIN batches b ON b.id = m.batch_id
                    WHERE m.tenant_id = %s AND m.{where} FOR UPDATE OF m""",
                params,
            )
            rows = cur.fetchall()
            if any(r["cancelled"] for r in rows):
                raise Conflict("The batch was cancelled; its messages are not sent again.")
            cur.execute(
                """UPDATE messages SET status = 'queued', tries = 0, last_error = NULL,
                          dead_lettered_at = NULL, finished_at = NULL, lease_until = NULL,
                          updated_at = now(), relay_after = now() + make_interval(secs => %s)
                   WHERE id = ANY(%s::uuid[])
                   RETURNING id::text, tenant_id, queue_id, batch_id""",
                (RELAY_AFTER_S, [r["id"] for r in rows]),
            )
            requeued = [dict(r) for r in cur.fetchall()]
            cur.execute(
                """UPDATE batches SET finished_at = NULL, webhook_status = NULL, webhook_next_at = NULL
                   WHERE id = ANY(%s::uuid[]) AND finished_at IS NOT NULL""",
                (list({str(r["batch_id"]) for r in requeued if r["batch_id"]}),),
            )
            return requeued

    # -- webhooks ---------------------------------------------------------------------------

    def take_due_webhooks(self, limit: int, lease_s: float) -> list[Row]:
        """Lease due webhook deliveries so that two sweepers never send the same one at once.
        Each take is a new attempt (`webhook_attempts` + 1): the number that fences its result.
        The rows carry `webhook_secret`, for signing; it goes nowhere else."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE batches SET webhook_attempts = webhook_attempts + 1,
                          webhook_next_at = now() + make_interval(secs => %s)
                   WHERE id IN (SELECT id FROM batches
                                WHERE webhook_status = 'pending' AND webhook_next_at <= now()
                                ORDER BY webhook_next_at LIMIT %s FOR UPDATE SKIP LOCKED)
                   RETURNING *""",
                (lease_s, limit),
            )
            return [dict(r) for r in cur.fetchall()]

    def batch_counts(self, batch_id: str) -> dict[str, int]:
        with self.db.tx() as cur:
            cur.execute(
                "SELECT status, count(*) AS n FROM messages WHERE batch_id = %s GROUP BY status",
                (batch_id,),
            )
            return {r["status"]: r["n"] for r in cur.fetchall()}

    def webhook_result(
        self, batch_id: str, attempt: int, status: str, error: str | None, retry_s: float
    ) -> bool:
        """Record attempt `attempt`'s outcome; False (nothing written) when it is no longer the
        latest attempt: its lease ran out and another sweeper has taken the delivery since."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE batches SET webhook_status = %s, webhook_last_error = %s,
                          webhook_next_at = CASE WHEN %s = 'pending'
                                THEN now() + make_interval(secs => %s) END
                   WHERE id = %s AND webhook_attempts = %s AND webhook_status = 'pending'""",
                (status, error, status, retry_s, batch_id, attempt),
            )
            return cur.rowcount == 1

    # -- a tenant's webhook endpoints --------------------------------------------------------

    def create_endpoint(self, tenant: str, row: Row) -> Row:
        with self.db.tx() as cur:
            cur.execute(
                f"""INSERT INTO webhook_endpoints (tenant_id, id, url, description, secret)
                    VALUES (%s, %s, %s, %s, %s) RETURNING {ENDPOINT_COLUMNS}""",
                (tenant, row["id"], row["url"], row["description"], row["secret"]),
            )
            return dict(cur.fetchone())

    def list_endpoints(self, tenant: str) -> list[Row]:
        with self.db.tx() as cur:
            cur.execute(
                f"""SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = %s
                    ORDER BY created_at, id""",
                (tenant,),
            )
            return [dict(r) for r in cur.fetchall()]

    def get_endpoint(self, tenant: str, endpoint_id: str) -> Row:
        with self.db.tx() as cur:
            cur.execute(
                f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = %s AND id = %s",
                (tenant, endpoint_id),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFound(f"No webhook endpoint {endpoint_id}.")
        return dict(row)

    def update_endpoint(self, tenant: str, endpoint_id: str, changes: Row) -> Row:
        """`url`, `description` and `enabled`; turned off, its deliveries still waiting fail."""
        sets = ", ".join(f"{col} = %({col})s" for col in changes)
        if "enabled" in changes:
            sets += ", disabled_reason = CASE WHEN %(enabled)s THEN NULL ELSE %(reason)s END"
        with self.db.tx() as cur:
            cur.execute(
                f"""UPDATE webhook_endpoints SET {sets}, updated_at = now()
                    WHERE tenant_id = %(tenant)s AND id = %(id)s RETURNING {ENDPOINT_COLUMNS}""",
                {**changes, "reason": "turned off", "tenant": tenant, "id": endpoint_id},
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"No webhook endpoint {endpoint_id}.")
            if not row["enabled"]:
                _fail_waiting(cur, endpoint_id, "the endpoint was turned off")
            return dict(row)

    def delete_endpoint(self, tenant: str, endpoint_id: str) -> None:
        with self.db.tx() as cur:
            cur.execute(
                "DELETE FROM webhook_endpoints WHERE tenant_id = %s AND id = %s", (tenant, endpoint_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"No webhook endpoint {endpoint_id}.")

    def take_due_deliveries(self, limit: int, lease_s: float) -> list[Row]:
        """What `take_due_webhooks` does for batches' own webhooks, for the deliveries to tenants'
        endpoints (turned-on ones only): each row is the batch with its delivery's `endpoint_id`,
        `event`, `attempts`, `url` and sealed `secret`."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE webhook_deliveries d SET attempts = d.attempts + 1,
                          next_at = now() + make_interval(secs => %s)
                   FROM webhook_endpoints e, batches b
                   WHERE e.id = d.endpoint_id AND b.id = d.batch_id
                     AND (d.endpoint_id, d.batch_id, d.event) IN (
                         SELECT w.endpoint_id, w.batch_id, w.event
                         FROM webhook_deliveries w JOIN webhook_endpoints o ON o.id = w.endpoint_id
                         WHERE w.status = 'pending' AND w.next_at <= now() AND o.enabled
                         ORDER BY w.next_at LIMIT %s FOR UPDATE OF w SKIP LOCKED)
                   RETURNING b.id, b.tenant_id, b.queue_id, b.total, b.created_at, b.finished_at,
                             b.cancelled_at, b.finishes, d.endpoint_id::text, d.event, d.attempts,
                             e.url, e.secret""",
                (lease_s, limit),
            )
            return [dict(r) for r in cur.fetchall()]

    def delivery_result(
        self, row: Row, status: str, error: str | None, retry_s: float, gone: bool = False
    ) -> bool:
        """`webhook_result` for a delivery to an endpoint; `gone` (a 410) turns the endpoint
        off, and its other deliveries still waiting fail with it."""
        with self.db.tx() as cur:
            cur.execute(
                """UPDATE webhook_deliveries SET status = %s, last_error = %s,
                          next_at = CASE WHEN %s = 'pending'
                                THEN now() + make_interval(secs => %s) ELSE next_at END
                   WHERE endpoint_id = %s AND batch_id = %s AND event = %s AND attempts = %s
                     AND status = 'pending'""",
                (status, error, status, retry_s, *(row[k] for k in DELIVERY_KEY), row["attempts"]),
            )
            if cur.rowcount != 1:
                return False
            if gone:
                cur.execute(
                    """UPDATE webhook_endpoints SET enabled = false, disabled_reason = %s,
                              updated_at = now() WHERE id = %s""",
                    (error, row["endpoint_id"]),
                )
                _fail_waiting(cur, row["endpoint_id"], error)
            return True

    def endpoint_deliveries(self, batch_id: str) -> list[Row]:
        """A batch's deliveries to its tenant's endpoints, for the batch's view."""
        with self.db.tx() as cur:
            cur.execute(
                """SELECT endpoint_id::text, event, status, attempts, last_error
                   FROM webhook_deliveries WHERE batch_id = %s ORDER BY created_at, endpoint_id""",
                (batch_id,),
            )
            return [dict(r) for r in cur.fetchall()]

    def ping(self) -> None:
        self.db.ping()
