"""How records look to API clients. Provider keys never leave except masked."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..adapters.secrets_box import masked
from ..domain.models import Status

Row = dict[str, Any]


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def provider_view(row: Row, weight: float | None = None) -> Row:
    view = {
        "provider_id": str(row["id"]),
        "provider_name": row["name"],
        "provider_type": row["provider_type"],
        "api_key": masked(row["api_key"]),  # the stored tail: the key is not opened
        "limit": row["request_limit"],
        "time_window": row["time_window"],
        "token_limit": row["token_limit"],
        "max_concurrency": row["max_concurrency"],
        "config": row["config"],
        "status": row["status"],
        "status_detail": row["status_detail"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }
    if weight is not None:
        view["weight"] = weight
    return view


def all_counts(counts: Row) -> dict[str, int]:
    return {s.value: int(counts.get(s.value, 0)) for s in Status}


def message_view(row: Row) -> Row:
    request = row["request"]
    prompt = next((m.get("content") for m in request.get("messages", []) if m.get("role") == "user"), None)
    return {
        "message_id": str(row["id"]),
        "queue_id": row["queue_id"],
        "batch_id": None if row["batch_id"] is None else str(row["batch_id"]),
        "custom_id": row["custom_id"],
        "status": row["status"],
        "prompt": prompt,
        "request": request,
        "metadata": row["metadata"],
        "response": row["response_text"],
        "provider": None
        if row["provider_id"] is None
        else {
            "provider_id": str(row["provider_id"]),
            "provider_name": row["provider_name"],
        },
        "model": row["model"],
        "usage": None
        if row["prompt_tokens"] is None
        else {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "total_tokens": row["prompt_tokens"] + (row["completion_tokens"] or 0),
        },
        "latency_ms": row["latency_ms"],
        "attempts": row["tries"],
        "last_error": row["last_error"],
        "dead_lettered": row["dead_lettered_at"] is not None,
        "created_at": iso(row["created_at"]),
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
        "updated_at": iso(row["updated_at"]),
    }
