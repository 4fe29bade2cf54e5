"""Providers: first-class, so several queues can share one provider and so one limit."""

from __future__ import annotations

import uuid
from typing import Any

from ..adapters.egress import check_destination
from ..bootstrap import Container
from ..domain.schemas import ProviderIn, ProviderPatch, parse
from ..errors import Conflict, NotFound, ValidationFailed
from .views import Row, provider_view


def provider_row(p: ProviderIn) -> Row:
    return {
        "id": str(uuid.uuid4()),
        "name": p.provider_name,
        "provider_type": p.provider_type,
        "api_key": p.api_key,
        "limit": p.limit,
        "time_window": p.time_window,
        "token_limit": p.token_limit,
        "max_concurrency": p.max_concurrency,
        "config": p.config.model_dump(exclude_none=True),
    }


def check_endpoint(c: Container, endpoint: str | None, field: str = "config.endpoint") -> None:
    """A given endpoint passes the egress guard now (and again at every connection): a 422
    naming `field` otherwise. None: the provider type's public endpoint."""
    if endpoint is not None:
        check_destination(endpoint, c.settings.egress_allow, field)


def checked_id(value: str, kind: str) -> str:
    """Ids in paths are UUIDs; anything else cannot name a record."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"No {kind} {value}.") from None


def create(c: Container, tenant: str, body: Any) -> Row:
    p = parse(ProviderIn, body)
    check_endpoint(c, p.config.endpoint)
    row = provider_row(p)
    return provider_view(c.store.create_provider(tenant, row))


def list_all(c: Container, tenant: str) -> Row:
    return {"providers": [provider_view(r) for r in c.store.list_providers(tenant)]}


def get(c: Container, tenant: str, provider_id: str) -> Row:
    return provider_view(c.store.get_provider(tenant, checked_id(provider_id, "provider")))


STORED_KEY = "stored-key"  # stands in for the stored key while a patch is validated


def update(c: Container, tenant: str, provider_id: str, body: Any) -> Row:
    provider_id = checked_id(provider_id, "provider")
    patch = parse(ProviderPatch, body).model_dump(exclude_unset=True)
    if not patch:
        raise ValidationFailed("Nothing to update: send at least one provider field.")
    current = c.store.get_provider(tenant, provider_id)
    merged = {
        "provider_name": current["name"],
        "provider_type": current["provider_type"],
        # The stored key is neither opened nor written again: a patch that leaves it alone
        # works even when it cannot be opened, and one that replaces it is how it is mended.
        "api_key": STORED_KEY,
        "limit": current["request_limit"],
        "time_window": current["time_window"],
        "token_limit": current["token_limit"],
        "max_concurrency": current["max_concurrency"],
        **{k: v for k, v in patch.items() if k != "config"},
        "config": {**current["config"], **(patch.get("config") or {})},
    }
    try:
        checked = parse(ProviderIn, merged)
    except ValidationFailed as exc:  # the patch is valid, but not with what is stored
        raise Conflict(
            f"The provider would not be valid with this change: {exc.detail}", **exc.extra
        ) from None
    if "endpoint" in (patch.get("config") or {}):
        check_endpoint(c, checked.config.endpoint)
    full = provider_row(checked)
    changes = {
        k: full[k]
        for k in ("name", "provider_type", "time_window", "token_limit", "max_concurrency", "config")
    }
    changes["request_limit"] = full["limit"]
    if "api_key" in patch:
        changes["api_key"] = full["api_key"]
    if "api_key" in patch or "provider_type" in patch:
        changes.update(status="active", status_detail=None)
    return provider_view(c.store.update_provider(tenant, provider_id, changes))


def delete(c: Container, tenant: str, provider_id: str) -> None:
    c.store.delete_provider(tenant, checked_id(provider_id, "provider"))
