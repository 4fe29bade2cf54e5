"""Shared fixtures. Tiers by folder: unit (no I/O), integration (real services), e2e (HTTP).

Tests that need PostgreSQL, Redis or RabbitMQ fail, not skip, when one is unreachable.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from ai_rate_limiter.adapters.secrets_box import new_secret
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings
from ai_rate_limiter.migrate import ensure_database, migrate

from local import fake_provider
from local.fresh import drop_broker_queues, fresh_state
from local.services_check import unreachable

# Provider keys are sealed in the tests as everywhere: one secret for the whole run, which the
# processes the tests start get too (e2e's stack_env).
PROVIDER_KEY_SECRETS = new_secret()
ADMIN_API_KEY = f"airl_test-admin-{uuid.uuid4().hex}"  # the tests' admin key, here and in the stack


def base_settings(**overrides: Any) -> Settings:
    env = {
        "DATABASE_URL": os.environ.get(
            "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/ai_rate_limiter_test"
        ),
        "REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
        "RABBITMQ_URL": os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        "BROKER_PREFIX": f"airltest{os.getpid()}",
        "WORKER_TIMEOUT_S": "60",
        "PROVIDER_TIMEOUT_S": "10",
        "WEBHOOK_TIMEOUT_S": "3",
        "WORKER_IDLE_S": "0.2",
        "PROVIDER_KEY_SECRETS": PROVIDER_KEY_SECRETS,
        "ADMIN_API_KEY": ADMIN_API_KEY,
        # The in-process API's own limits are tested on their own (test_inbound.py); the stack
        # the e2e tier starts runs with the defaults.
        "INBOUND_PER_S": "0",
        "INBOUND_WRITES": "0",
    }
    return replace(Settings.from_env(env), **overrides)


@pytest.fixture(scope="session", autouse=True)
def provider_key_secrets() -> Iterator[None]:
    """Processes the tests start (the bridge's execution environments) seal and open provider
    keys with the tests' secret too: they read it from the environment."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PROVIDER_KEY_SECRETS", PROVIDER_KEY_SECRETS)
        yield


@pytest.fixture(scope="session")
def services() -> None:
    down = unreachable(base_settings())
    if down:
        pytest.fail(f"required services unreachable: {down}")


CLOSED_PORT = "127.0.0.1:9"  # where the tests find nothing listening


def egress_allow(*urls: str) -> str:
    """EGRESS_ALLOW for the tests' own local servers at these URLs, and the closed port."""
    return ",".join([*(urlsplit(u).netloc for u in urls), CLOSED_PORT])


@pytest.fixture(scope="session")
def settings(services: None, fake_server: FakeProvider, receiver_server: Receiver) -> Iterator[Settings]:
    """The tests' settings: the egress guard lets through the fake provider, the webhook
    receiver and the closed port, here and in the processes tests start (the bridge's
    execution environments read EGRESS_ALLOW from the environment)."""
    allow = egress_allow(fake_server.url, receiver_server.url)
    s = base_settings(egress_allow=allow)
    ensure_database(s.database_url)
    migrate(s.database_url)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("EGRESS_ALLOW", allow)
        yield s


@pytest.fixture()
def container(settings: Settings) -> Iterator[Container]:
    """A container on flushed services: empty tables, an empty Redis database."""
    c = fresh_state(Container(settings))
    yield c
    drop_broker_queues(c)
    c.close()


class FakeProvider:
    def __init__(self) -> None:
        self.server = fake_provider.serve("127.0.0.1", 0, fake_provider.Settings(latency_ms=5, jitter_ms=2))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def configure(self, **config: Any) -> dict[str, Any]:
        return httpx.post(f"{self.url}/_fake/config", json=config).json()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_fake/reset", json={})
        self.configure(
            latency_ms=5,
            jitter_ms=2,
            error_rate=0,
            limit=0,
            window=1,
            latency_dist="uniform",
            sigma=1.0,
            max_latency_ms=60_000.0,
        )

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/_fake/stats").json()


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeProvider]:
    fake = FakeProvider()
    yield fake
    fake.server.shutdown()


@pytest.fixture()
def fake(fake_server: FakeProvider) -> FakeProvider:
    fake_server.reset()
    return fake_server


def random_key() -> str:
    return f"sk-test-{uuid.uuid4().hex}"


class Receiver:
    """Answers 500 to the first `failures` deliveries, then 204; keeps what it was sent."""

    def __init__(self, failures: int) -> None:
        self.failures, self.received = failures, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.received.append((self.headers["content-type"], body))
                status = 500 if len(outer.received) <= outer.failures else 204
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self, failures: int) -> None:
        self.failures, self.received = failures, []


@pytest.fixture(scope="session")
def receiver_server() -> Iterator[Receiver]:
    """One receiver for the session, on the port EGRESS_ALLOW names."""
    r = Receiver(failures=2)
    yield r
    r.server.shutdown()


@pytest.fixture()
def receiver(receiver_server: Receiver) -> Receiver:
    receiver_server.reset(failures=2)
    return receiver_server
