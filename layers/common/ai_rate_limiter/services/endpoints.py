"""A tenant's webhook endpoints: each is sent every batch event of the tenant (today
`batch.completed`), signed with a secret of its own, shown once, when the endpoint is made.
A batch's own `webhook_url` goes on working beside them."""

from __future__ import annotations

import uuid
from typing import Any

from ..adapters.egress import check_destination
from ..adapters.webhooks import endpoint_secret_id, new_secret
from ..bootstrap import Container
from ..domain.schemas import WebhookIn, WebhookPatch, parse
from ..errors import ValidationFailed
from .providers import checked_id
from .views import Row, iso


def view(row: Row) -> Row:
    """Named fields only: never `secret`."""
    return {
        "webhook_id": row["id"],
        "url": row["url"],
        "description": row["description"],
        "enabled": row["enabled"],
        "disabled_reason": row["disabled_reason"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


def create(c: Container, tenant: str, body: Any) -> Row:
    spec = parse(WebhookIn, body)
    check_destination(spec.url, c.settings.egress_allow, "url")  # and again at every delivery
    endpoint_id = str(uuid.uuid4())
    secret = new_secret()
    row = c.store.create_endpoint(
        tenant,
        {
            "id": endpoint_id,
            "url": spec.url,
            "description": spec.description,
            "secret": c.keys.seal(endpoint_secret_id(endpoint_id), secret),
        },
    )
    return {**view(row), "secret": secret}  # shown this once


def list_all(c: Container, tenant: str) -> Row:
    return {"webhooks": [view(r) for r in c.store.list_endpoints(tenant)]}


def get(c: Container, tenant: str, endpoint_id: str) -> Row:
    return view(c.store.get_endpoint(tenant, checked_id(endpoint_id, "webhook endpoint")))


def update(c: Container, tenant: str, endpoint_id: str, body: Any) -> Row:
    endpoint_id = checked_id(endpoint_id, "webhook endpoint")
    changes = parse(WebhookPatch, body).model_dump(exclude_unset=True)
    if not changes:
        raise ValidationFailed("Nothing to update: send url, description or enabled.")
    c.store.get_endpoint(tenant, endpoint_id)  # an unknown id is 404 before the URL is judged
    if "url" in changes:
        check_destination(changes["url"], c.settings.egress_allow, "url")
    return view(c.store.update_endpoint(tenant, endpoint_id, changes))


def delete(c: Container, tenant: str, endpoint_id: str) -> None:
    c.store.delete_endpoint(tenant, checked_id(endpoint_id, "webhook endpoint"))
