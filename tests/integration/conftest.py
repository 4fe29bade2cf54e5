from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pika
import pytest
from ai_rate_limiter.adapters.rabbitmq import connection_parameters
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.domain.rmq_event import basic_properties, build_event
from ai_rate_limiter.services import invocation, messages, queues
from chalice.test import Client

from local.functions import load
from tests.conftest import FakeProvider, random_key

from .webhook_receiver import Hook, reachable

JSON = {"Content-Type": "application/json"}


class Reply:
    def __init__(self, what: str, status_code: int, headers: dict[str, str], body: bytes) -> None:
        self.what, self.status_code, self.headers, self.body = what, status_code, headers, body
        self.json: Any = json.loads(body) if headers.get("content-type", "").endswith("json") else None


class Api:
    """The Chalice app in process (chalice.test.Client), called with an API key (the admin key
    unless another is given); keeps every reply."""

    def __init__(self, client: Client, key: str) -> None:
        self.client, self.http, self.key = client, client.http, key
        self.replies: list[Reply] = []

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        key: str | None = None,
    ) -> Reply:
        """`headers` replace the JSON content type; the key goes as a bearer token unless they
        carry one, or `key` is ""."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = dict(JSON if headers is None else headers)
        key = self.key if key is None else key
        if key and not {"authorization", "x-api-key"} & {h.lower() for h in sent}:
            sent["Authorization"] = f"Bearer {key}"
        r = getattr(self.http, method)(path, headers=sent, body=data)
        lowered = {k.lower(): v for k, v in r.headers.items()}
        reply = Reply(f"{method.upper()} {path}", r.status_code, lowered, r.body)
        self.replies.append(reply)
        return reply


def provider(fake_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider_name": "OpenAI",
        "provider_type": "openai",
        "api_key": random_key(),
        "limit": 1000,
        "time_window": 3600,
        "config": {"model": "gpt-4o", "endpoint": fake_url},
        **extra,
    }


def assert_problem(r: Any, status: int, *words: str) -> None:
    assert r.status_code == status, r.body
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json["status"] == status and r.json["title"] and r.json["detail"]
    for word in words:
        assert word in r.json["detail"], r.json


def count_rows(c: Container) -> tuple[int, ...]:
    with c.db.tx() as cur:
        cur.execute("""SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM batches),
                              (SELECT count(*) FROM queues), (SELECT count(*) FROM providers),
                              (SELECT count(*) FROM webhook_endpoints)""")
        return tuple(cur.fetchone().values())


def app_on(c: Container, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The API function's app, serving from `c`."""
    module = load("api", "app")
    monkeypatch.setattr(module, "container", lambda: c)
    return module.app


@pytest.fixture()
def api(container: Container, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    with Client(app_on(container, monkeypatch)) as client:
        yield Api(client, container.settings.admin_api_key)


def make_queue(c: Container, fake_url: str, *providers: dict[str, Any], workers: int = 1) -> str:
    """A queue on the fake provider; each provider dict overrides the defaults."""
    queue_id = f"q-{uuid.uuid4().hex[:10]}"
    specs = []
    for extra in providers or ({},):
        spec = {
            "provider_name": "fake",
            "provider_type": "openai",
            "api_key": random_key(),
            "limit": 1000,
            "time_window": 1,
            "config": {"endpoint": fake_url},
        }
        spec.update(extra)
        specs.append(spec)
    queues.create(
        c, c.settings.default_tenant, {"queue_id": queue_id, "providers": specs, "workers": workers}
    )
    return queue_id


def allow_egress(c: Container, monkeypatch: pytest.MonkeyPatch, *urls: str) -> None:
    """Let the egress guard through to these URLs' `host:port` too, for this test: for a local
    server of its own on a random port (the session's fake and receiver are already allowed).
    Clients already built keep their allowlist, so they are dropped to be built again."""
    extra = ",".join(urlsplit(u).netloc for u in urls)
    allow = f"{c.settings.egress_allow},{extra}" if c.settings.egress_allow else extra
    monkeypatch.setattr(c, "settings", replace(c.settings, egress_allow=allow))
    for built in ("providers", "webhooks"):
        c.__dict__.pop(built, None)


def take_event(c: Container, queue_id: str, n: int, timeout: float = 5.0) -> dict[str, Any]:
    """Take up to `n` deliveries off the queue (acked) as the Amazon MQ event Lambda would get."""
    name = c.names(c.settings.default_tenant, queue_id).main
    conn = pika.BlockingConnection(connection_parameters(c.settings.rabbitmq_url))
    got: list[tuple[bytes, bool, dict[str, Any]]] = []
    try:
        ch = conn.channel()
        end = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < end:
            method, props, body = ch.basic_get(name, auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            got.append(
                (
                    body,
                    method.redelivered,
                    basic_properties(props.content_type, props.headers, props.delivery_mode, len(body)),
                )
            )
    finally:
        conn.close()
    return build_event(name, "/", got)


class Context:
    def __init__(self, seconds: float = 60) -> None:
        self.deadline = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


def submitted_batch(c: Container, fake: FakeProvider, webhook_url: str | None) -> dict[str, Any]:
    """A two-message batch, its messages done: the submission's answer."""
    q = make_queue(c, fake.url)
    b = messages.submit(
        c,
        "default",
        {"queue_id": q, "webhook_url": webhook_url, "messages": [{"prompt": "a"}, {"prompt": "b"}]},
    )
    invocation.handle_event(c, take_event(c, q, 2), 30)
    return b


def finished_batch(c: Container, fake: FakeProvider, webhook_url: str | None) -> str:
    return str(submitted_batch(c, fake, webhook_url)["batch_id"])


@pytest.fixture()
def hooks(container: Container) -> Iterator[Callable[..., Hook]]:
    """Makes receivers (`hooks(*script)`) the container may deliver to; stops them after."""
    made: list[Hook] = []

    def make(*script: Any) -> Hook:
        made.append(hook := Hook(*script))
        reachable(container, hook.url)
        return hook

    yield make
    for hook in made:
        hook.server.shutdown()
