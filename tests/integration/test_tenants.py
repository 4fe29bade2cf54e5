"""API keys and tenants: every route but /health needs a key, and a tenant sees only its own."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.services import invocation, messages
from chalice.test import Client

from local.functions import load
from tests.conftest import FakeProvider

from .conftest import Api, app_on, assert_problem, count_rows, make_queue, provider, take_event
from .webhook_receiver import Hook

T = "default"
UNKNOWN = "9d7e7a5e-0000-4000-8000-000000000000"


@pytest.fixture()
def app(container: Container, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    with Client(app_on(container, monkeypatch)) as client:
        yield client


@pytest.fixture()
def admin(app: Client, container: Container) -> Api:
    return Api(app, container.settings.admin_api_key)


def new_tenant(admin: Api, app: Client) -> tuple[Api, dict[str, Any]]:
    made = admin.call("post", "/admin/tenants", {"name": "acme"})
    assert made.status_code == 201, made.body
    return Api(app, made.json["api_key"]), made.json


def every_route(app: Client) -> list[tuple[str, str]]:
    """(method, path) of every route the API has, as Chalice registered them."""
    routes = load("api", "app").app.routes
    return sorted((method.lower(), path) for path, entries in routes.items() for method in entries)


def test_every_route_but_health_needs_a_key(app: Client, container: Container) -> None:
    routes = every_route(app)
    assert ("get", "/health") in routes and ("post", "/admin/tenants") in routes
    before = count_rows(container)
    anonymous = Api(app, "")
    for method, path in routes:
        concrete = re.sub(r"\{[^}]+\}", UNKNOWN, path)
        if (method, path) == ("get", "/health"):
            assert anonymous.call(method, concrete).status_code == 200
            continue
        for headers in ({"Content-Type": "application/json"}, {"Authorization": "Bearer airl_wrong"}):
            r = anonymous.call(method, concrete, {}, headers=headers)
            assert_problem(r, 401, "key")
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert count_rows(container) == before


def test_the_key_is_taken_as_a_bearer_token_or_an_x_api_key(admin: Api, app: Client) -> None:
    tenant, made = new_tenant(admin, app)
    key = made["api_key"]
    assert tenant.call("get", "/queues", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert tenant.call("get", "/queues", headers={"authorization": f"bearer {key}"}).status_code == 200
    assert tenant.call("get", "/queues", headers={"X-Api-Key": key}).status_code == 200
    assert tenant.call("get", "/queues", headers={"Authorization": f"Basic {key}"}).status_code == 401
    assert tenant.call("get", "/queues", headers={"X-Api-Key": key[:-1]}).status_code == 401
    assert tenant.call("get", "/queues", headers={"X-Api-Key": "x" * 10_000}).status_code == 401


def test_the_admin_key_manages_tenants_and_is_the_default_tenant(
    admin: Api, app: Client, container: Container, fake: FakeProvider
) -> None:
    tenant, made = new_tenant(admin, app)
    assert made["tenant_id"].startswith("t-") and made["api_key"].startswith("airl_")
    # The admin key is the default tenant for every other route: a single user needs no other key.
    assert (
        admin.call(
            "post", "/queue/create", {"queue_id": "mine", "providers": [provider(fake.url)]}
        ).status_code
        == 201
    )
    assert [q["queue_id"] for q in admin.call("get", "/queues").json["queues"]] == ["mine"]
    assert tenant.call("get", "/queues").json["queues"] == []
    # A tenant's key does not manage tenants.
    before = count_rows(container)
    for method, path in (("get", "/admin/tenants"), ("post", "/admin/tenants")):
        assert_problem(tenant.call(method, path, {}), 403, "admin")
    assert_problem(tenant.call("post", f"/admin/tenants/{made['tenant_id']}/keys", {}), 403)
    assert count_rows(container) == before
    listed = admin.call("get", "/admin/tenants").json["tenants"]
    mine = next(t for t in listed if t["tenant_id"] == made["tenant_id"])
    assert mine["name"] == "acme" and [k["key_id"] for k in mine["keys"]] == [made["key_id"]]
    assert mine["keys"][0]["prefix"] == made["api_key"][:12] and made["api_key"] not in str(listed)


def test_keys_are_stored_hashed_and_shown_once(admin: Api, app: Client, container: Container) -> None:
    _, made = new_tenant(admin, app)
    with container.db.tx() as cur:
        cur.execute("SELECT * FROM api_keys WHERE tenant_id = %s", (made["tenant_id"],))
        (row,) = cur.fetchall()
    assert made["api_key"] not in repr(row) and made["api_key"].encode() not in bytes(row["key_hash"])


def test_keys_are_added_rotated_and_revoked_at_once(admin: Api, app: Client) -> None:
    tenant, made = new_tenant(admin, app)
    tid = made["tenant_id"]
    second = admin.call("post", f"/admin/tenants/{tid}/keys").json
    assert second["tenant_id"] == tid and second["api_key"] != made["api_key"]
    both = [Api(app, made["api_key"]), Api(app, second["api_key"])]
    assert [a.call("get", "/queues").status_code for a in both] == [200, 200]
    # Rotation: a new key, and every other one revoked in the same step.
    third = admin.call("post", f"/admin/tenants/{tid}/keys", {"replace": True}).json
    assert [a.call("get", "/queues").status_code for a in both] == [401, 401]
    rotated = Api(app, third["api_key"])
    assert rotated.call("get", "/queues").status_code == 200
    assert admin.call("delete", f"/admin/tenants/{tid}/keys/{third['key_id']}").status_code == 200
    assert rotated.call("get", "/queues").status_code == 401  # at once
    assert_problem(admin.call("delete", f"/admin/tenants/{tid}/keys/not-a-key"), 404)
    assert_problem(admin.call("delete", f"/admin/tenants/{tid}/keys/{UNKNOWN}"), 404)
    assert_problem(admin.call("post", f"/admin/tenants/{UNKNOWN}/keys"), 404)
    assert_problem(admin.call("post", f"/admin/tenants/{tid}/keys", {"replace": "yes"}), 422, "replace")
    assert_problem(admin.call("post", f"/admin/tenants/{tid}/keys", raw=b"null"), 400, "JSON object")
    assert_problem(admin.call("post", "/admin/tenants", {"tenant_id": tid}), 409, tid)
    assert_problem(admin.call("post", "/admin/tenants", {"tenant_id": "Not Valid!"}), 422, "tenant_id")
    assert tenant.call("get", "/queues").status_code == 401  # the first key went with the rotation


def test_another_tenants_ids_are_404_on_every_route_and_change_nothing(
    admin: Api, app: Client, container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    """The default tenant (the admin key) owns a provider, a queue, a batch, a message and a
    webhook endpoint; another tenant tries every route with those ids."""
    q = make_queue(container, fake.url)
    pid = admin.call("get", "/providers").json["providers"][0]["provider_id"]
    batch = messages.submit(container, T, {"queue_id": q, "messages": [{"prompt": "a"}, {"prompt": "b"}]})
    single = messages.submit(container, T, {"queue_id": q, "prompt": "c"})
    invocation.handle_event(container, take_event(container, q, 3), 30)
    ids = {
        "provider_id": pid,
        "queue_id": q,
        "batch_id": batch["batch_id"],
        "message_id": single["message_id"],
        "webhook_id": admin.call("post", "/webhooks", {"url": hooks(204).url}).json["webhook_id"],
    }
    other, made = new_tenant(admin, app)
    ids["tenant_id"], ids["key_id"] = made["tenant_id"], made["key_id"]
    before = count_rows(container)
    bodies: dict[str, Any] = {
        "/provider/update/{provider_id}": {"limit": 1},
        "/queue/{queue_id}": {"workers": 2},
        "/message/create": {"queue_id": q, "prompt": "x"},
        "/queue/create": {"queue_id": "theirs", "providers": [{"provider_id": pid}]},
        "/webhooks/{webhook_id}": {"enabled": False},
    }
    theirs = [v for k, v in ids.items() if k not in ("tenant_id", "key_id")]
    tried = 0
    for method, path in every_route(app):
        if path.startswith("/admin") or path == "/health":
            continue
        if "{" in path or path in bodies:  # their ids, in a path or a body, are unknown here
            assert_problem(other.call(method, path.format(**ids), bodies.get(path, {})), 404)
        elif method == "get":  # a list: none of theirs in it
            r = other.call(method, path)
            assert r.status_code == 200 and not any(v in str(r.json) for v in theirs), (path, r.body)
        else:
            continue  # a route that names nothing of theirs (POST /provider/create)
        tried += 1
    assert tried >= 20
    assert count_rows(container) == before
    assert admin.call("get", f"/provider/{pid}").json["limit"] == 1000
    theirs_batch = admin.call("get", f"/batch/{batch['batch_id']}").json
    assert theirs_batch["counts"]["completed"] == 2 and theirs_batch["cancelled_at"] is None
    assert admin.call("get", f"/webhooks/{ids['webhook_id']}").json["enabled"] is True


def test_a_queue_reaches_only_its_own_tenants_providers(container: Container, fake: FakeProvider) -> None:
    """The worker looks up a queue's providers with the queue's tenant, so a row naming another
    tenant's provider cannot lend its key."""
    q = make_queue(container, fake.url)
    ((row, _),) = container.store.queue_providers(T, q)
    theirs = f"t-{uuid.uuid4().hex[:8]}"
    with container.db.tx() as cur:
        cur.execute("INSERT INTO queues (tenant_id, queue_id) VALUES (%s, %s)", (theirs, q))
        cur.execute(
            "INSERT INTO queue_providers (tenant_id, queue_id, provider_id, position) VALUES (%s, %s, %s, 0)",
            (theirs, q, row["id"]),
        )
    assert container.store.queue_providers(theirs, q) == []
