from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import pika
import pytest
from ai_rate_limiter.adapters.rabbitmq import connection_parameters
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.domain.rmq_event import basic_properties, build_event
from ai_rate_limiter.services import queues

from tests.conftest import random_key


def make_queue(c: Container, fake_url: str, *providers: dict[str, Any]) -> str:
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
    queues.create(c, c.settings.default_tenant, {"queue_id": queue_id, "providers": specs})
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
