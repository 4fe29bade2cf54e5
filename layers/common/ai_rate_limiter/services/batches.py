"""Batches: progress, their messages page by page, and results as JSON or CSV in input order."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from ..bootstrap import Container
from ..domain.progress import batch_progress
from ..errors import ValidationFailed
from . import dispatch
from .providers import checked_id
from .views import Row, iso, message_view

RESULT_COLUMNS = (
    "seq AS index, id::text AS message_id, custom_id, "
    "request->'messages'->0->>'content' AS prompt, status, response_text AS response, "
    "provider_name AS provider, model, prompt_tokens, completion_tokens, latency_ms, "
    "tries AS attempts, last_error AS error"
)
CSV_FIELDS = (
    "index",
    "message_id",
    "custom_id",
    "prompt",
    "status",
    "response",
    "provider",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "attempts",
    "error",
)


def progress(c: Container, tenant: str, batch_id: str) -> Row:
    b = c.store.batch_progress(tenant, checked_id(batch_id, "batch"))
    p = batch_progress(
        b["total"],
        b["counts"],
        b["created_at"],
        datetime.now(UTC),
        finished=b["finished_at"] is not None,
        cancelled=b["cancelled_at"] is not None,
    )
    return {
        "batch_id": str(b["id"]),
        "queue_id": b["queue_id"],
        "status": p.status,
        "total": p.total,
        "done": p.done,
        "counts": p.counts,
        "percent": p.percent,
        "eta_seconds": p.eta_s,
        "created_at": iso(b["created_at"]),
        "started_at": iso(b["started_at"]),
        "finished_at": iso(b["finished_at"]),
        "cancelled_at": iso(b["cancelled_at"]),
        # Named fields only: never `webhook_secret`, which is shown once, when the batch is made.
        "webhook": None
        if not b["webhook_url"]
        else {
            "url": b["webhook_url"],
            "event": b["webhook_event"],
            "status": b["webhook_status"],
            "attempts": b["webhook_attempts"],
            "last_error": b["webhook_last_error"],
        },
        # Its events' deliveries to the tenant's webhook endpoints (made once it finishes).
        "deliveries": [
            {
                "webhook_id": d["endpoint_id"],
                "event": d["event"],
                "status": d["status"],
                "attempts": d["attempts"],
                "last_error": d["last_error"],
            }
            for d in c.store.endpoint_deliveries(str(b["id"]))
        ],
        "results_url": f"{c.settings.public_base_url}/batch/{b['id']}/results",
    }


def page_args(c: Container, query: Mapping[str, str] | None) -> tuple[int, int]:
    """`?limit=` (1..max_page_size) and `?cursor=` (the last index already read)."""
    query = query or {}
    try:
        limit = int(query.get("limit", c.settings.page_size))
        cursor = int(query.get("cursor", -1))
    except ValueError:
        raise ValidationFailed("limit and cursor must be integers.") from None
    if not 1 <= limit <= c.settings.max_page_size or cursor < -1:
        raise ValidationFailed(f"limit must be 1..{c.settings.max_page_size}; cursor ≥ -1.")
    return limit, cursor


def _page(
    c: Container, tenant: str, batch_id: str, query: Mapping[str, str] | None, columns: str
) -> tuple[list[Row], str | None, int]:
    batch_id = checked_id(batch_id, "batch")
    batch = c.store.get_batch(tenant, batch_id)
    limit, cursor = page_args(c, query)
    rows = c.store.batch_page(tenant, batch_id, cursor, limit, columns)
    last = rows[-1]["index"] if rows else cursor
    more = len(rows) == limit and last < batch["total"] - 1
    return rows, (str(last) if more else None), batch["total"]


def messages(c: Container, tenant: str, batch_id: str, query: Mapping[str, str] | None) -> Row:
    rows, next_cursor, total = _page(c, tenant, batch_id, query, "*, seq AS index")
    return {
        "batch_id": batch_id,
        "total": total,
        "next_cursor": next_cursor,
        "messages": [{"index": r["index"], **message_view(r)} for r in rows],
    }


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula gets a leading `'` (OWASP's advice on
    CSV injection): prompts and answers are the users' and the models' text."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def next_link(batch_id: str, query: Mapping[str, str] | None, next_cursor: str) -> str:
    """The `Link: rel="next"` value, from the parameters this route defines only, URL-encoded."""
    query = query or {}
    params = {k: query[k] for k in ("format", "limit") if k in query}
    params["cursor"] = next_cursor
    return f'</batch/{quote(batch_id, safe="")}/results?{urlencode(params)}>; rel="next"'


def results(
    c: Container, tenant: str, batch_id: str, query: Mapping[str, str] | None
) -> tuple[str, Any, str | None]:
    """One page of results: (content type, body, next cursor)."""
    fmt = (query or {}).get("format", "json")
    if fmt not in ("json", "csv"):
        raise ValidationFailed("format must be json or csv.")
    rows, next_cursor, total = _page(c, tenant, batch_id, query, RESULT_COLUMNS)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in r.items()} for r in rows)
        return "text/csv; charset=utf-8", out.getvalue(), next_cursor
    body = {"batch_id": batch_id, "total": total, "next_cursor": next_cursor, "results": rows}
    return "application/json", body, next_cursor


def cancel(c: Container, tenant: str, batch_id: str) -> Row:
    """Cancel what has not started; what is in flight finishes, what is done is kept, and the
    batch's webhook says `cancelled` once nothing is in flight."""
    batch_id = checked_id(batch_id, "batch")
    c.store.cancel_batch(tenant, batch_id)
    c.store.finish_batch_if_done(batch_id)
    return progress(c, tenant, batch_id)


def retry_failed(c: Container, tenant: str, batch_id: str) -> Row:
    """Send the batch's failed messages again, with their tries back to none."""
    batch_id = checked_id(batch_id, "batch")
    c.store.get_batch(tenant, batch_id)  # 404 if there is none
    requeued = dispatch.requeue(c, c.store.requeue(tenant, batch_id=batch_id))
    return {"batch_id": batch_id, "requeued": requeued, "status": progress(c, tenant, batch_id)["status"]}
