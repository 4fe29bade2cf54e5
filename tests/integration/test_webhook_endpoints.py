"""A tenant's webhook endpoints: made, changed and deleted over the API; every batch event of
the tenant delivered to each, signed with its own secret; a 410 turns one off."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ai_rate_limiter.adapters.webhooks import verify
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.services import batches, sweeper
from chalice.test import Client

from tests.conftest import FakeProvider

from .conftest import Api, app_on, assert_problem, count_rows, finished_batch
from .webhook_receiver import Hook

T = "default"


@pytest.fixture()
def api(container: Container, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 0.0)
    with Client(app_on(container, monkeypatch)) as client:
        yield Api(client, container.settings.admin_api_key)


def endpoint(api: Api, url: str, **fields: Any) -> dict[str, Any]:
    r = api.call("post", "/webhooks", {"url": url, **fields})
    assert r.status_code == 201, r.body
    made: dict[str, Any] = r.json
    return made


def deliveries(c: Container, batch_id: str) -> list[tuple[str, str, int, str | None]]:
    return [
        (d["webhook_id"], d["status"], d["attempts"], d["last_error"])
        for d in batches.progress(c, T, batch_id)["deliveries"]
    ]


def test_an_endpoint_is_made_listed_changed_and_deleted_and_its_secret_shown_once(
    api: Api, container: Container, hooks: Callable[..., Hook], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hook = hooks(204)
    made = endpoint(api, hook.url, description="billing")
    wid, secret = made["webhook_id"], made["secret"]
    assert secret.startswith("whsec_")
    assert made["enabled"] is True and made["disabled_reason"] is None and made["description"] == "billing"
    seen = [
        api.call("get", "/webhooks").json,
        api.call("get", f"/webhooks/{wid}").json,
        api.call("patch", f"/webhooks/{wid}", {"description": "all batches"}).json,
    ]
    assert [w["webhook_id"] for w in seen[0]["webhooks"]] == [wid]
    assert seen[1]["url"] == hook.url and seen[2]["description"] == "all batches"
    texts = [json.dumps(s) for s in seen] + [r.getMessage() + repr(r.args) for r in caplog.records]
    for text in texts:
        assert secret not in text and secret[6:] not in text and '"secret"' not in text
    with container.db.tx() as cur:  # stored sealed, for this endpoint alone
        cur.execute("SELECT secret FROM webhook_endpoints WHERE id = %s", (wid,))
        stored = cur.fetchone()["secret"]
    assert stored.startswith("sealed1$") and secret[6:] not in stored
    assert api.call("delete", f"/webhooks/{wid}").json == {"webhook_id": wid, "deleted": True}
    assert_problem(api.call("get", f"/webhooks/{wid}"), 404)
    assert_problem(api.call("delete", f"/webhooks/{wid}"), 404)
    assert api.call("get", "/webhooks").json == {"webhooks": []}


@pytest.mark.parametrize(
    ("body", "status", "word"),
    [
        ({}, 422, "url"),
        ({"url": "ftp://example.com/hook"}, 422, "url"),
        ({"url": "http://10.0.0.7/hook"}, 422, "url"),  # the egress guard: a private address
        ({"url": "http://169.254.169.254/latest/meta-data"}, 422, "url"),
        ({"url": "https://example.com/hook", "secret": "whsec_mine"}, 422, "secret"),
        ({"url": "https://example.com/hook", "description": "x" * 501}, 422, "description"),
    ],
)
def test_a_bad_endpoint_is_refused_and_nothing_is_made(
    api: Api, container: Container, body: dict[str, Any], status: int, word: str
) -> None:
    before = count_rows(container)
    r = api.call("post", "/webhooks", body)
    assert_problem(r, status)
    assert word in json.dumps(r.json)
    assert count_rows(container) == before


def test_a_bad_change_is_refused_and_changes_nothing(api: Api, hooks: Callable[..., Hook]) -> None:
    wid = endpoint(api, hooks(204).url)["webhook_id"]
    before = api.call("get", f"/webhooks/{wid}").json
    for body in ({}, {"url": None}, {"url": "http://127.0.0.2:1/x"}, {"enabled": "yes"}, {"other": 1}):
        assert_problem(api.call("patch", f"/webhooks/{wid}", body), 422)
    assert api.call("get", f"/webhooks/{wid}").json == before
    assert_problem(api.call("patch", "/webhooks/not-an-id", {"enabled": False}), 404)


def test_every_endpoint_and_the_batchs_own_url_get_the_event_each_signed_with_its_own_secret(
    api: Api, container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    own, first, second, off = hooks(204), hooks(500, 204), hooks(204), hooks(204)
    made = [endpoint(api, h.url) for h in (first, second, off)]
    api.call("patch", f"/webhooks/{made[2]['webhook_id']}", {"enabled": False})
    bid = finished_batch(container, fake, own.url)
    swept = sweeper.sweep(container)
    assert (swept["webhooks_sent"], swept["webhooks_retrying"]) == (2, 1)
    assert sweeper.sweep(container)["webhooks_sent"] == 1  # the retry
    assert off.received == []
    msg_id = "msg_" + bid.replace("-", "")
    for hook, spec in ((first, made[0]), (second, made[1])):
        for headers, body in hook.received:
            assert headers["webhook-id"] == msg_id
            assert verify(spec["secret"], headers, body)
            assert not verify(made[2]["secret"], headers, body)
            assert json.loads(body)["batch_id"] == bid and json.loads(body)["event"] == "batch.completed"
    assert len(first.received) == 2 and len(second.received) == 1 and len(own.received) == 1
    assert sorted(deliveries(container, bid)) == sorted(
        [(made[0]["webhook_id"], "delivered", 2, None), (made[1]["webhook_id"], "delivered", 1, None)]
    )
    assert batches.progress(container, T, bid)["webhook"]["status"] == "delivered"


def test_a_410_turns_the_endpoint_off_until_it_is_turned_on_again(
    api: Api, container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    hook = hooks(410, 204)
    wid = endpoint(api, hook.url)["webhook_id"]
    first = finished_batch(container, fake, None)
    assert sweeper.sweep(container)["webhooks_failed"] == 1
    state = api.call("get", f"/webhooks/{wid}").json
    assert state["enabled"] is False and state["disabled_reason"] == "endpoint gone (410)"
    second = finished_batch(container, fake, None)  # finished while off: nothing for it
    assert sweeper.sweep(container)["webhooks_sent"] == 0
    assert len(hook.received) == 1 and deliveries(container, second) == []
    assert deliveries(container, first) == [(wid, "failed", 1, "endpoint gone (410)")]
    on = api.call("patch", f"/webhooks/{wid}", {"enabled": True}).json
    assert on["enabled"] is True and on["disabled_reason"] is None
    third = finished_batch(container, fake, None)
    assert sweeper.sweep(container)["webhooks_sent"] == 1
    assert json.loads(hook.received[-1][1])["batch_id"] == third


def test_turning_an_endpoint_off_fails_what_waits_for_it(
    api: Api, container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    hook = hooks(503)
    wid = endpoint(api, hook.url)["webhook_id"]
    bid = finished_batch(container, fake, None)
    assert sweeper.sweep(container)["webhooks_retrying"] == 1
    api.call("patch", f"/webhooks/{wid}", {"enabled": False})
    assert sweeper.sweep(container)["webhooks_retrying"] == 0
    assert deliveries(container, bid) == [(wid, "failed", 1, "the endpoint was turned off")]
    assert len(hook.received) == 1


def test_a_delivery_result_written_after_its_lease_ran_out_is_not_recorded(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    wid = endpoint(api, "http://127.0.0.1:9/unused")["webhook_id"]
    bid = finished_batch(container, fake, None)
    store = container.store
    [first] = store.take_due_deliveries(5, lease_s=60)
    assert (first["endpoint_id"], str(first["id"]), first["attempts"]) == (wid, bid, 1)
    assert first["secret"].startswith("sealed1$")
    assert store.take_due_deliveries(5, lease_s=60) == []  # leased: nobody else takes it
    with container.db.tx() as cur:  # the lease runs out while attempt 1 is still out there
        cur.execute("UPDATE webhook_deliveries SET next_at = now() - interval '1 second'")
    [second] = store.take_due_deliveries(5, lease_s=60)
    assert second["attempts"] == 2
    assert not store.delivery_result(first, "delivered", None, 0)  # attempt 1's late answer
    assert deliveries(container, bid) == [(wid, "pending", 2, None)]
    assert store.delivery_result(second, "delivered", None, 0)
    assert deliveries(container, bid) == [(wid, "delivered", 2, None)]


def test_a_tenants_endpoint_hears_only_its_own_batches(
    api: Api, container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    hook = hooks(204)
    made = api.call("post", "/admin/tenants", {"name": "acme"}).json
    other = Api(api.client, made["api_key"])
    assert other.call("post", "/webhooks", {"url": hook.url}).status_code == 201
    finished_batch(container, fake, None)  # the default tenant's
    assert sweeper.sweep(container)["webhooks_sent"] == 0
    assert hook.received == []
