"""The canary: a provider key planted through the API shows up nowhere it must not.

It must reach the provider (the fake provider sees it) and be kept in the database only sealed.
It is searched for in the body and headers of every response of every route called, every log
record (every logger, at DEBUG), every message left in the queues' broker queues, every webhook
delivery, every key and value in Redis, and every text and jsonb column of every table; in the
database also as its base64 and hex. One provider echoes the Authorization header back in its
error messages, as some providers and proxies do, so the key comes back to us in an error.

Also here, on the real database: a key stored before encryption is sealed when a process
starts, Postgres refuses a plaintext key, `rotate_keys` re-seals every key under a new secret,
and a stored key that was tampered with is a 503, not a 500.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
import psycopg2
import psycopg2.errors
import pytest
import redis
from ai_rate_limiter import rotate_keys
from ai_rate_limiter.adapters import secrets_box
from ai_rate_limiter.adapters.postgres import provider_from_row
from ai_rate_limiter.adapters.rabbitmq import connection_parameters
from ai_rate_limiter.adapters.secrets_box import KeyUnreadable, new_secret
from ai_rate_limiter.adapters.webhooks import batch_secret_id, endpoint_secret_id
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings
from ai_rate_limiter.errors import DependencyUnavailable
from ai_rate_limiter.migrate import ensure_database, migrate, migrations_dir
from ai_rate_limiter.services import endpoints, invocation, messages, providers, sweeper
from chalice.test import Client

from tests.conftest import CLOSED_PORT, FakeProvider, Receiver

from .conftest import Api, app_on, make_queue, take_event

T = "default"


def canary() -> str:
    return f"sk-canary-{uuid.uuid4().hex}"


class EchoProvider:
    """Speaks OpenAI's chat API badly: the first request of each key gets a 500, the rest a
    401, each with the Authorization header it was sent in its error message."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                auth = self.headers.get("authorization") or self.headers.get("x-api-key") or ""
                status = 500 if auth not in outer.seen else 401
                outer.seen.append(auth)
                body = json.dumps(
                    {
                        "error": {
                            "message": f"Incorrect API key provided: {auth}. Header was {auth!r}.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "invalid_api_key",
                        }
                    }
                ).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def echo() -> Iterator[EchoProvider]:
    e = EchoProvider()
    yield e
    e.server.shutdown()


def reaching(settings: Settings, url: str) -> Settings:
    """Settings whose egress guard also lets `url` through."""
    allow = ",".join(a for a in (settings.egress_allow, urlsplit(url).netloc) if a)
    return replace(settings, egress_allow=allow)


@pytest.fixture()
def api(container: Container, echo: EchoProvider, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    container.settings = reaching(container.settings, echo.url)
    with Client(app_on(container, monkeypatch)) as client:
        yield Api(client, container.settings.admin_api_key)


def forms(secret: str) -> list[str]:
    """The key, and what its base64 (standard or URL-safe, at any alignment) or hex contains."""
    raw = secret.encode()
    out = [secret, raw.hex()]
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            out.append(encode(b"\0" * offset + raw).decode()[4:-4])
    return out


def leaks(text: str, *secrets: str) -> list[str]:
    return [s for s in secrets if s in text]


def broker_bodies(c: Container, queue_ids: list[str]) -> list[bytes]:
    """Every message in the queues' broker queues, read without taking it (nothing is acked)."""
    conn = pika.BlockingConnection(connection_parameters(c.settings.rabbitmq_url))
    bodies: list[bytes] = []
    try:
        ch = conn.channel()
        for q in queue_ids:
            names = c.names(T, q)
            delays = [n for _, n in names.delays()]
            for name in (*names.shards(4), *delays, *names.legacy_delays(), names.dead_letter):
                try:
                    ch.queue_declare(name, passive=True)
                except pika.exceptions.ChannelClosedByBroker:
                    ch = conn.channel()
                    continue
                while True:
                    method, props, body = ch.basic_get(name, auto_ack=False)
                    if method is None:
                        break
                    bodies.append(body + repr(props.headers).encode())
        return bodies
    finally:
        conn.close()  # the unacked messages go back to their queues


def table_rows(c: Container) -> dict[str, list[str]]:
    """Every row of every table in the public schema, as JSON text."""
    with c.db.tx() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
        tables = [r["tablename"] for r in cur.fetchall()]
        out = {}
        for table in tables:
            cur.execute(f'SELECT row_to_json(t)::text AS j FROM "{table}" t')
            out[table] = [r["j"] for r in cur.fetchall()]
    return out


def redis_text(c: Container) -> str:
    r = redis.Redis.from_url(c.settings.redis_url)
    parts: list[str] = []
    for key in r.scan_iter(count=1000):
        parts.append(repr(key))
        kind = r.type(key)
        if kind == b"string":
            parts.append(repr(r.get(key)))
        elif kind == b"hash":
            parts.append(repr(r.hgetall(key)))
        elif kind == b"zset":
            parts.append(repr(r.zrange(key, 0, -1)))
        elif kind == b"list":
            parts.append(repr(r.lrange(key, 0, -1)))
    return "\n".join(parts)


def test_a_canary_key_appears_nowhere_but_at_its_provider(
    api: Api,
    container: Container,
    fake: FakeProvider,
    echo: EchoProvider,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 0.0)
    planted, echoed, refused = canary(), canary(), canary()

    # Providers: created, read, listed, changed (with and without the key), refused.
    created = api.call(
        "post",
        "/provider/create",
        {
            "provider_name": "canary",
            "provider_type": "openai",
            "api_key": planted,
            "limit": 1000,
            "time_window": 60,
            "config": {"model": "gpt-4o", "endpoint": fake.url},
        },
    )
    assert created.status_code == 201, created.body
    assert created.json["api_key"] == "****" + planted[-4:]
    pid = created.json["provider_id"]
    assert api.call("patch", f"/provider/update/{pid}", {"limit": 900}).status_code == 200
    assert api.call("patch", f"/provider/update/{pid}", {"api_key": planted}).status_code == 200
    assert api.call("get", f"/provider/{pid}").json["api_key"] == "****" + planted[-4:]
    api.call("get", "/providers")
    bad = {"provider_name": "x", "provider_type": "openai", "api_key": refused, "limit": 0}
    assert api.call("post", "/provider/create", bad).status_code == 422
    assert (
        api.call("post", "/provider/create", {**bad, "limit": 1, "api_key": refused + " x"}).status_code
        == 422
    )
    assert api.call("patch", f"/provider/update/{pid}", {"api_key": refused, "limit": -1}).status_code == 422

    # Queues: one on the canary provider, one with an inline provider whose endpoint echoes.
    qa, qe = f"canary-{uuid.uuid4().hex[:8]}", f"echo-{uuid.uuid4().hex[:8]}"
    assert (
        api.call("post", "/queue/create", {"queue_id": qa, "providers": [{"provider_id": pid}]}).status_code
        == 201
    )
    inline = {
        "provider_name": "echo",
        "provider_type": "openai",
        "api_key": echoed,
        "limit": 1000,
        "time_window": 60,
        "config": {"endpoint": echo.url},
    }
    assert api.call("post", "/queue/create", {"queue_id": qe, "providers": [inline]}).status_code == 201
    assert (
        api.call(
            "post", "/queue/create", {"queue_id": qe, "providers": [{**inline, "api_key": refused}]}
        ).status_code
        == 409
    )
    api.call("get", "/queues")
    api.call("patch", f"/queue/{qa}", {"workers": 1})

    # Messages through the worker: a batch with a webhook on the canary provider, one message
    # on the echoing one (a 500, retried, then a 401, each naming the key it was sent).
    batch = api.call(
        "post",
        "/message/create",
        {
            "queue_id": qa,
            "messages": [{"prompt": f"p{i}", "metadata": {"i": i}} for i in range(3)],
            "webhook_url": receiver.url,
        },
    ).json
    single = api.call("post", "/message/create", {"queue_id": qe, "prompt": "echo me"}).json
    assert invocation.handle_event(container, take_event(container, qa, 3), 30)["completed"] == 3
    invocation.handle_event(container, take_event(container, qe, 1), 30)
    for _ in range(4):
        sweeper.sweep(container)
    # Left in the broker, to be searched there: one more message for each queue.
    left = [api.call("post", "/message/create", {"queue_id": q, "prompt": "waits"}).json for q in (qa, qe)]

    bid = batch["batch_id"]
    for path in (
        f"/provider/{pid}",
        "/providers",
        f"/queue/{qa}",
        f"/queue/{qe}",
        "/queues",
        "/workers",
        f"/batch/{bid}",
        f"/batch/{bid}/messages",
        f"/batch/{bid}/results",
        f"/batch/{bid}/results?format=csv",
        f"/message/read/{single['message_id']}",
        *(f"/message/read/{m['message_id']}" for m in left),
        "/health",
    ):
        assert api.call("get", path).status_code == 200, path
    results = api.call("get", f"/batch/{bid}/results").json["results"]
    for row in results:
        api.call("get", f"/message/read/{row['message_id']}")

    # The keys did their work: the fake provider answered the canary, the echo saw its key and
    # its error came back to us, the key masked in it.
    assert planted in fake.stats()["keys"]
    assert [r["status"] for r in results] == ["completed"] * 3
    assert echo.seen and all(echoed in seen for seen in echo.seen)
    failed = api.call("get", f"/message/read/{single['message_id']}").json
    assert failed["status"] == "failed" and "Incorrect API key provided" in failed["last_error"]
    assert "****" in failed["last_error"]
    assert receiver.received, "the webhook was delivered"

    secrets = [planted, echoed, refused]
    everywhere = [s for key in secrets for s in forms(key)]
    for r in api.replies:
        assert not leaks(r.body.decode(errors="replace"), *secrets), r.what
        assert not leaks(json.dumps(r.headers), *secrets), r.what
    for record in caplog.records:
        text = f"{record.getMessage()} {record.args!r} {record.exc_text or ''} {record.__dict__!r}"
        assert not leaks(text, *secrets), record.getMessage()
    assert not leaks(caplog.text, *secrets)
    bodies = broker_bodies(container, [qa, qe])
    assert len(bodies) >= 2, "the waiting messages were found"
    for body in bodies:
        assert not leaks(body.decode(errors="replace"), *secrets)
    assert not leaks(repr(receiver.received), *secrets)
    assert not leaks(redis_text(container), *everywhere)
    rows = table_rows(container)
    assert rows["providers"] and rows["messages"]
    for table, texts in rows.items():
        for text in texts:
            assert not leaks(text, *everywhere), table
    stored = [json.loads(t)["api_key"] for t in rows["providers"]]
    assert all(s.startswith("sealed1$") for s in stored) and len(stored) == 2


def test_a_tampered_key_holds_its_messages_back_until_a_new_key_mends_it(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    key = canary()
    body = {
        "provider_name": "tampered",
        "provider_type": "openai",
        "api_key": key,
        "limit": 1000,
        "config": {"endpoint": fake.url},
    }
    q = f"tampered-{uuid.uuid4().hex[:8]}"
    assert api.call("post", "/queue/create", {"queue_id": q, "providers": [body]}).status_code == 201
    pid = api.call("get", f"/queue/{q}").json["providers"][0]["provider_id"]
    with container.db.tx() as cur:  # one character of the ciphertext changed, as an attacker might
        cur.execute(
            """UPDATE providers SET api_key = left(api_key, length(api_key) - 5)
                      || CASE WHEN right(api_key, 5) LIKE 'A%%' THEN 'B' ELSE 'A' END || right(api_key, 4)
               WHERE id = %s""",
            (pid,),
        )
    # Views never open keys: the provider still reads, masked; a patch that leaves the key
    # alone does not open it either.
    assert api.call("get", f"/provider/{pid}").json["api_key"] == "****" + key[-4:]
    changed = api.call("patch", f"/provider/update/{pid}", {"limit": 5})
    assert changed.status_code == 200 and changed.json["api_key"] == "****" + key[-4:]
    # The worker does not fail the message: the invocation raises, so the batch is redelivered.
    mid = api.call("post", "/message/create", {"queue_id": q, "prompt": "hi"}).json["message_id"]
    event = take_event(container, q, 1)
    with pytest.raises(DependencyUnavailable) as caught:
        invocation.handle_event(container, event, 30)
    assert isinstance(caught.value, KeyUnreadable) and pid in caught.value.detail
    assert key not in str(caught.value) and "cannot be decrypted" in caught.value.detail
    # Given back at once, not when its lease ends: the event's next delivery takes it again.
    assert api.call("get", f"/message/read/{mid}").json["status"] == "queued"
    assert fake.stats()["total"]["requests"] == 0
    # A new key mends it, without the old one ever being opened.
    mended = canary()
    assert api.call("patch", f"/provider/update/{pid}", {"api_key": mended}).status_code == 200
    assert invocation.handle_event(container, event, 30) == {"completed": 1}  # the event again
    assert api.call("get", f"/message/read/{mid}").json["status"] == "completed"


def test_rotate_keys_reseals_every_key_under_the_new_secret(
    container: Container,
    fake: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = [canary() for _ in range(3)]
    spec = {"provider_name": "r", "provider_type": "openai", "limit": 10, "config": {"endpoint": fake.url}}
    ids = [providers.create(container, T, {**spec, "api_key": k})["provider_id"] for k in keys]
    q = make_queue(container, fake.url)
    hook = f"http://{CLOSED_PORT}/hook"
    batch = messages.submit(container, T, {"queue_id": q, "webhook_url": hook, "messages": [{"prompt": "a"}]})
    endpoint = endpoints.create(container, T, {"url": hook})
    old = container.settings.provider_key_secrets
    new = new_secret()
    monkeypatch.setenv("DATABASE_URL", container.settings.database_url)
    monkeypatch.setenv("PROVIDER_KEY_SECRETS", f"{new},{old}")
    assert rotate_keys.main([]) == 0
    # the three, and the queue's own provider's; the batch's and the endpoint's secrets
    assert "re-sealed 4 provider key(s) and 2 webhook secret(s)" in capsys.readouterr().out
    only_new = secrets_box.from_settings(replace(container.settings, provider_key_secrets=new))
    secrets_box.use(only_new)
    for pid, key in zip(ids, keys, strict=True):
        assert provider_from_row(container.store.get_provider(T, pid)).api_key == key
    with container.db.tx() as cur:
        cur.execute("SELECT webhook_secret FROM batches WHERE id = %s", (batch["batch_id"],))
        sealed_batch = cur.fetchone()["webhook_secret"]
        cur.execute("SELECT secret FROM webhook_endpoints WHERE id = %s", (endpoint["webhook_id"],))
        sealed_endpoint = cur.fetchone()["secret"]
    assert only_new.open(batch_secret_id(batch["batch_id"]), sealed_batch) == batch["webhook_secret"]
    assert only_new.open(endpoint_secret_id(endpoint["webhook_id"]), sealed_endpoint) == endpoint["secret"]


def test_keys_stored_before_encryption_are_sealed_when_a_process_starts(
    settings: Settings, tmp_path: Path
) -> None:
    name = f"airl_keys_{uuid.uuid4().hex[:8]}"
    url = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))
    before = tmp_path / "before"
    before.mkdir()
    for path in migrations_dir().glob("*.sql"):
        if path.name < "0005":
            shutil.copy(path, before)
    ensure_database(url)
    c: Container | None = None
    try:
        migrate(url, before)
        legacy, pid = "sk-legacy-" + uuid.uuid4().hex, str(uuid.uuid4())
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute(
                """INSERT INTO providers (id, name, provider_type, api_key, request_limit, time_window)
                   VALUES (%s, 'old', 'openai', %s, 10, 60)""",
                (pid, legacy),
            )
        conn.close()
        migrate(url)
        c = Container(replace(settings, database_url=url))
        row = c.store.get_provider(T, pid)  # the store comes with the box, which sealed the row
        assert row["api_key"].startswith("sealed1$") and legacy not in row["api_key"]
        assert provider_from_row(row).api_key == legacy
        assert providers.get(c, T, pid)["api_key"] == "****" + legacy[-4:]
        with pytest.raises(psycopg2.errors.CheckViolation), c.db.tx() as cur:
            cur.execute("UPDATE providers SET api_key = 'sk-plaintext-again-123456' WHERE id = %s", (pid,))
    finally:
        if c is not None:
            c.close()
        admin = psycopg2.connect(urlunsplit(urlsplit(url)._replace(path="/postgres")))
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
