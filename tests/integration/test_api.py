"""The Chalice app in process (chalice.test.Client) on the real Postgres, Redis and RabbitMQ."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from urllib.parse import quote

import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.services import health, invocation, sweeper

from tests.conftest import FakeProvider

from .conftest import Api, assert_problem, count_rows, provider, take_event


def test_health_names_each_dependency(api: Api) -> None:
    r = api.call("get", "/health")
    assert r.status_code == 200
    assert r.json["dependencies"] == {"postgres": "ok", "redis": "ok", "rabbitmq": "ok", "key_store": "ok"}


def test_health_says_when_the_key_store_cannot_start(
    api: Api, container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No data key (none configured, or KMS refusing): the service can neither take nor use a
    provider key, and /health says which dependency it is rather than blaming Postgres."""
    from ai_rate_limiter import bootstrap
    from ai_rate_limiter.adapters.secrets_box import KeyStoreUnavailable

    def refuse(settings: object) -> None:
        raise KeyStoreUnavailable("Provider keys: kms: AccessDeniedException on Decrypt")

    monkeypatch.setattr(bootstrap, "from_settings", refuse)
    monkeypatch.delitem(container.__dict__, "keys", raising=False)
    monkeypatch.delitem(container.__dict__, "store", raising=False)
    assert health.check(container, container.settings.default_tenant)[1]["dependencies"] == {
        "postgres": "ok",
        "redis": "ok",
        "rabbitmq": "ok",
        "key_store": "down: Provider keys: kms: AccessDeniedException on Decrypt",
    }
    # Over HTTP no key can be checked without the store, so every caller gets what anyone gets.
    for key in ("", api.key):
        r = api.call("get", "/health", key=key)
        assert r.status_code == 503 and r.json["detail"] == "unreachable: key_store"
        assert r.json["dependencies"]["key_store"] == "down"
        assert "AccessDenied" not in r.body.decode()


def test_health_is_503_naming_the_dependency_that_is_down(
    api: Api, container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ai_rate_limiter.adapters.redis_limiter import RedisLimiter

    monkeypatch.setattr(container, "limiter", RedisLimiter("redis://127.0.0.1:1/0"))
    r = api.call("get", "/health")
    assert r.status_code == 503
    assert r.json["dependencies"]["redis"].startswith("down: redis")  # why, to a caller with a key
    assert r.json["dependencies"]["postgres"] == "ok" and "redis" in r.json["detail"]
    # Anyone else learns what is down, not the error (which names the host).
    for key in ("", "airl_not-a-key"):
        anonymous = api.call("get", "/health", key=key)
        assert anonymous.status_code == 503 and anonymous.json["dependencies"]["redis"] == "down"
        assert "127.0.0.1" not in anonymous.body.decode()


def test_provider_lifecycle_never_shows_the_key(api: Api, fake: FakeProvider) -> None:
    body = provider(fake.url)
    created = api.call("post", "/provider/create", body)
    assert created.status_code == 201
    pid = created.json["provider_id"]
    assert created.json["api_key"] == "****" + body["api_key"][-4:]
    listed = api.call("get", "/providers")
    got = api.call("get", f"/provider/{pid}")
    patched = api.call("patch", f"/provider/update/{pid}", {"limit": 5, "config": {"model": "m2"}})
    assert patched.status_code == 200
    assert patched.json["limit"] == 5
    assert patched.json["config"] == {"model": "m2", "endpoint": fake.url}
    for r in (created, listed, got, patched):
        assert body["api_key"] not in r.body.decode()
    assert api.call("delete", f"/provider/delete/{pid}").status_code == 200
    assert_problem(api.call("get", f"/provider/{pid}"), 404, pid)


def test_provider_errors_change_nothing(api: Api, container: Container, fake: FakeProvider) -> None:
    pid = api.call("post", "/provider/create", provider(fake.url)).json["provider_id"]
    before = count_rows(container)
    assert_problem(api.call("post", "/provider/create", {**provider(fake.url), "limit": -1}), 422, "limit")
    assert_problem(api.call("patch", f"/provider/update/{pid}", {"provider_type": "nope"}), 422)
    assert_problem(api.call("patch", f"/provider/update/{pid}", {}), 422, "Nothing to update")
    assert_problem(api.call("patch", "/provider/update/not-a-uuid", {"limit": 1}), 404)
    assert_problem(api.call("patch", f"/provider/update/{pid}", {"limit": None}), 422, "limit")
    assert_problem(api.call("patch", f"/provider/update/{pid}", {"limit": 7.5}), 422, "limit")
    assert count_rows(container) == before
    assert api.call("get", f"/provider/{pid}").json["limit"] == 1000
    # Valid on its own, but not with what is stored: an Azure provider needs an endpoint.
    bare = api.call("post", "/provider/create", {**provider(fake.url), "config": {"model": "m"}})
    conflict = api.call("patch", f"/provider/update/{bare.json['provider_id']}", {"provider_type": "azure"})
    assert_problem(conflict, 409, "endpoint")
    assert api.call("get", f"/provider/{bare.json['provider_id']}").json["provider_type"] == "openai"
    # JSON Schema's integer: 7.0 is 7.
    assert api.call("patch", f"/provider/update/{pid}", {"limit": 7.0}).json["limit"] == 7


def test_malformed_bodies(api: Api) -> None:
    assert_problem(api.call("post", "/message/create", raw=b"{nope"), 400, "not valid JSON")
    assert_problem(api.call("post", "/message/create", raw=b"[1, 2]"), 400, "JSON object")
    assert_problem(
        api.call(
            "post",
            "/message/create",
            raw=b"queue_id=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        415,
    )


def test_queue_lifecycle_with_the_seed_body(api: Api, container: Container, fake: FakeProvider) -> None:
    seed = {"queue_id": "my-queue-123", "providers": [provider(fake.url)]}
    created = api.call("post", "/queue/create", seed)
    assert created.status_code == 201
    assert created.json["providers"][0]["provider_type"] == "openai"
    assert created.json["counts"] == {
        "queued": 0,
        "processing": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert_problem(api.call("post", "/queue/create", seed), 409, "already exists")
    shared = created.json["providers"][0]["provider_id"]
    second = api.call("post", "/queue/create", {"queue_id": "second", "providers": [{"provider_id": shared}]})
    assert second.status_code == 201
    assert [q["queue_id"] for q in api.call("get", "/queues").json["queues"]] == ["my-queue-123", "second"]
    assert_problem(api.call("delete", f"/provider/delete/{shared}"), 409, "my-queue-123")
    assert api.call("delete", "/queue/second").status_code == 200
    assert_problem(api.call("get", "/queue/second"), 404)
    assert_problem(api.call("delete", "/queue/second"), 404)


def test_a_queue_with_an_unknown_provider_is_not_created(api: Api, container: Container) -> None:
    before = count_rows(container)
    r = api.call(
        "post",
        "/queue/create",
        {"queue_id": "q", "providers": [{"provider_id": "9d7e7a5e-0000-4000-8000-000000000000"}]},
    )
    assert_problem(r, 404, "9d7e7a5e")
    assert count_rows(container) == before


def make_queue(api: Api, fake_url: str, queue_id: str = "q1") -> str:
    fast = provider(fake_url, time_window=1)
    assert api.call("post", "/queue/create", {"queue_id": queue_id, "providers": [fast]}).status_code == 201
    return queue_id


def test_single_message_read_and_cancel(api: Api, fake: FakeProvider) -> None:
    q = make_queue(api, fake.url)
    r = api.call(
        "post",
        "/message/create",
        {
            "queue_id": q,
            "prompt": "Hello, this is a test message",
            "system": "be brief",
            "custom_id": "c-1",
            "metadata": {"k": "v"},
        },
    )
    assert r.status_code == 202 and r.json["status"] == "queued"
    mid = r.json["message_id"]
    m = api.call("get", f"/message/read/{mid}").json
    assert (m["status"], m["prompt"], m["custom_id"], m["metadata"]) == (
        "queued",
        "Hello, this is a test message",
        "c-1",
        {"k": "v"},
    )
    assert m["request"]["system"] == "be brief"
    assert api.call("delete", f"/message/delete/{mid}").json["status"] == "cancelled"
    assert api.call("get", f"/message/read/{mid}").json["status"] == "cancelled"
    assert api.call("delete", f"/message/delete/{mid}").json["deleted"] is True
    assert_problem(api.call("get", f"/message/read/{mid}"), 404)


def test_message_errors_change_nothing(
    api: Api, container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(api, fake.url)
    before = count_rows(container)
    assert_problem(api.call("post", "/message/create", {"queue_id": "nope", "prompt": "x"}), 404)
    bad_batch = {"queue_id": q, "messages": [{"prompt": "ok"}, {"prompt": ""}, {"prompt": "ok"}]}
    r = api.call("post", "/message/create", bad_batch)
    assert_problem(r, 422, "messages.1.prompt")
    assert r.json["errors"][0]["field"] == "messages.1.prompt"
    monkeypatch.setattr(container, "settings", replace(container.settings, max_batch_size=2))
    assert_problem(
        api.call("post", "/message/create", {"queue_id": q, "messages": [{"prompt": "a"}] * 3}),
        413,
        "at most 2",
    )
    assert count_rows(container) == before


def test_a_publish_that_fails_after_the_commit_answers_202_and_the_relay_finishes_it(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(api, fake.url)
    container.broker.delete(container.names("default", q))  # the broker queue vanished
    r = api.call("post", "/message/create", {"queue_id": q, "messages": [{"prompt": "a"}]})
    assert r.status_code == 202, r.body
    with container.db.tx() as cur:
        cur.execute("UPDATE batches SET relay_after = now() WHERE id = %s", (r.json["batch_id"],))
    assert sweeper.sweep(container)["relayed"] == 1
    assert container.broker.ready(container.names("default", q).main) == 1


def test_batch_progress_pages_and_results_in_input_order(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(api, fake.url)
    prompts = [f"prompt number {i}, with a comma" for i in range(25)]
    r = api.call(
        "post",
        "/message/create",
        {
            "queue_id": q,
            "messages": [{"prompt": p, "custom_id": f"id-{i}"} for i, p in enumerate(prompts)],
            "webhook_url": "http://127.0.0.1:9/hook",
            "webhook_event": "on_complete",
        },
    )
    assert r.status_code == 202 and r.json["total"] == 25
    bid = r.json["batch_id"]
    progress = api.call("get", f"/batch/{bid}").json
    assert (progress["status"], progress["total"], progress["percent"]) == ("queued", 25, 0.0)
    assert progress["counts"]["queued"] == 25 and progress["webhook"]["status"] is None
    invocation.handle_event(container, take_event(container, q, 25), 30)
    done = api.call("get", f"/batch/{bid}").json
    assert (done["status"], done["percent"], done["eta_seconds"]) == ("completed", 100.0, 0.0)
    assert done["finished_at"] and done["webhook"]["status"] == "pending"

    page1 = api.call("get", f"/batch/{bid}/results?limit=10")
    assert page1.headers["x-next-cursor"] == "9" and 'rel="next"' in page1.headers["link"]
    rows = list(page1.json["results"])
    cursor = page1.json["next_cursor"]
    while cursor:
        page = api.call("get", f"/batch/{bid}/results?limit=10&cursor={cursor}").json
        rows += page["results"]
        cursor = page["next_cursor"]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["response"] for r in rows] == [f"Echo: {p}" for p in prompts]
    assert [r["custom_id"] for r in rows] == [f"id-{i}" for i in range(25)]

    csv_page = api.call("get", f"/batch/{bid}/results?format=csv&limit=100")
    assert csv_page.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(csv_page.body.decode())))
    assert [r["prompt"] for r in table] == prompts
    assert table[3]["response"] == f"Echo: {prompts[3]}" and table[3]["status"] == "completed"
    assert "x-next-cursor" not in csv_page.headers

    msgs = api.call("get", f"/batch/{bid}/messages?limit=5&cursor=19").json
    assert [m["index"] for m in msgs["messages"]] == [20, 21, 22, 23, 24]
    assert msgs["next_cursor"] is None
    assert_problem(api.call("get", f"/batch/{bid}/results?format=xml"), 422, "format")
    assert_problem(api.call("get", f"/batch/{bid}/results?limit=0"), 422, "limit")
    assert_problem(api.call("get", "/batch/00000000-0000-4000-8000-000000000000"), 404)
    mid = rows[0]["message_id"]
    assert_problem(api.call("delete", f"/message/delete/{mid}"), 409, "batch")


def test_deleting_a_queue_cancels_what_has_not_started(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(api, fake.url)
    bid = api.call(
        "post", "/message/create", {"queue_id": q, "messages": [{"prompt": "a"}, {"prompt": "b"}]}
    ).json["batch_id"]
    assert api.call("delete", f"/queue/{q}").status_code == 200
    progress = api.call("get", f"/batch/{bid}").json
    assert progress["counts"]["cancelled"] == 2 and progress["status"] == "completed"


def test_links_carry_only_our_parameters_and_csv_cells_never_start_a_formula(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(api, fake.url)
    prompts = ['=HYPERLINK("http://evil.example")', "+1+1", "-2", "@SUM(A1)", "\tx", "plain"]
    r = api.call("post", "/message/create", {"queue_id": q, "messages": [{"prompt": p} for p in prompts]})
    bid = r.json["batch_id"]
    invocation.handle_event(container, take_event(container, q, len(prompts)), 30)

    injected = '>; rel="next", <https://evil.example/'
    page = api.call("get", f"/batch/{bid}/results?limit=2&y={quote(injected)}&format=json")
    link = page.headers["link"]
    assert link.count('rel="next"') == 1 and "evil" not in link and "y=" not in link
    assert link == f'</batch/{bid}/results?format=json&limit=2&cursor=1>; rel="next"'

    body = api.call("get", f"/batch/{bid}/results?format=csv").body.decode()
    table = list(csv.DictReader(io.StringIO(body)))
    assert [row["prompt"] for row in table] == ["'" + p for p in prompts[:5]] + ["plain"]
    starts = ("=", "+", "-", "@", "\t", "\r")
    assert all(not cell.startswith(starts) for row in table for cell in row.values())


def test_bad_bodies_are_problems_and_change_nothing(api: Api, container: Container) -> None:
    before = count_rows(container)
    too_big = b'{"queue_id": "q", "prompt": "' + b"a" * container.settings.max_body_bytes + b'"}'
    assert_problem(api.call("post", "/message/create", raw=too_big), 413, "exceeds")
    deep = b'{"queue_id": "q", "prompt": "x", "metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"
    assert_problem(api.call("post", "/message/create", raw=deep), 400, "nested too deeply")
    nul = api.call("post", "/message/create", {"queue_id": "q", "messages": [{"prompt": "a\u0000"}]})
    assert_problem(nul, 422, "NUL")
    assert nul.json["errors"][0]["field"] == "messages.0.prompt"
    assert count_rows(container) == before
    assert container.settings.max_body_bytes == 6 * 1024 * 1024  # what a Lambda function accepts


def test_a_method_a_route_does_not_have_is_405_in_the_apis_shape(api: Api) -> None:
    r = api.call("put", "/queues", {})
    assert_problem(r, 405, "PUT")
    assert r.headers["allow"] == "GET"
