"""Who is calling: tenants, their API keys, and the admin key.

A key is sent as `Authorization: Bearer <key>` or `X-Api-Key: <key>` (what the OpenAI and
Anthropic SDKs send). Tenants' keys are stored as their SHA-256 only and shown once, when made.
The admin key (`ADMIN_API_KEY`) manages tenants and acts as the default tenant, so a
single-user deployment needs no other key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..bootstrap import Container
from ..domain.schemas import KeyIn, TenantIn, parse
from ..errors import Forbidden, NotFound, Unauthorized
from .views import Row, iso

KEY_PREFIX = "airl_"
SHOWN = 12  # characters of a key kept to tell it apart in a listing
MAX_KEY_LENGTH = 256


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key sent as `Authorization: Bearer <key>`, or else as `X-Api-Key`."""
    scheme, _, value = (headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = (headers.get("x-api-key") or "").strip()
    return key or None


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def caller(c: Container, headers: Mapping[str, str]) -> Caller:
    key = presented_key(headers)
    if key is None:
        raise Unauthorized("Send an API key as 'Authorization: Bearer <key>' or 'X-Api-Key: <key>'.")
    # A tenant's key first: its requests go on while the admin key's secret cannot be read.
    tenant = c.store.tenant_of_key(key_hash(key)) if len(key) <= MAX_KEY_LENGTH else None
    if tenant is not None:
        return Caller(tenant, admin=False)
    admin = c.admin_key
    if admin and hmac.compare_digest(key.encode(), admin.encode()):
        return Caller(c.settings.default_tenant, admin=True)
    raise Unauthorized("The API key is not valid (or was revoked).")


def admin_only(who: Caller) -> None:
    if not who.admin:
        raise Forbidden("Only the admin key manages tenants.")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _issue(c: Container, tenant_id: str, replace: bool) -> Row:
    key = new_key()
    row = c.store.add_api_key(tenant_id, str(uuid.uuid4()), key_hash(key), key[:SHOWN], replace)
    return {
        "tenant_id": tenant_id,
        "key_id": row["key_id"],
        "api_key": key,
        "created_at": iso(row["created_at"]),
    }


def create(c: Container, body: Any) -> Row:
    """A new tenant and its first key (shown this once)."""
    spec = parse(TenantIn, body)
    tenant_id = spec.tenant_id or f"t-{uuid.uuid4().hex[:16]}"
    row = c.store.create_tenant(tenant_id, spec.name)
    return {**_issue(c, tenant_id, replace=False), "name": row["name"]}


def add_key(c: Container, tenant_id: str, body: Any) -> Row:
    """Another key for the tenant (shown this once); with `"replace": true` its other keys are
    revoked at once (a rotation)."""
    spec = parse(KeyIn, body)
    if tenant_id == c.settings.default_tenant:
        c.store.ensure_tenant(tenant_id)  # the admin key's tenant exists without being made
    return _issue(c, tenant_id, spec.replace)


def revoke_key(c: Container, tenant_id: str, key_id: str) -> None:
    """At once: the next request with the key is refused."""
    try:
        key_id = str(uuid.UUID(key_id))
    except ValueError:
        raise NotFound(f"Key {key_id!r} of tenant {tenant_id!r} not found.") from None
    if not c.store.revoke_api_key(tenant_id, key_id):
        raise NotFound(f"Key {key_id!r} of tenant {tenant_id!r} not found.")


def list_all(c: Container) -> Row:
    tenants = c.store.list_tenants()
    for t in tenants:
        t["created_at"] = iso(t["created_at"])
    return {"tenants": tenants}
