"""Batch completion and webhook delivery, with a real HTTP receiver on loopback."""

from __future__ import annotations

import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.services import batches, invocation, messages, sweeper

from tests.conftest import FakeProvider, Receiver

from .conftest import make_queue, take_event


def finished_batch(c: Container, fake: FakeProvider, webhook_url: str | None) -> str:
    q = make_queue(c, fake.url)
    b = messages.submit(
        c,
        "default",
        {"queue_id": q, "webhook_url": webhook_url, "messages": [{"prompt": "a"}, {"prompt": "b"}]},
    )
    invocation.handle_event(c, take_event(c, q, 2), 30)
    return str(b["batch_id"])


def test_the_webhook_is_retried_until_the_receiver_accepts_it(
    container: Container, fake: FakeProvider, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 0.0)
    bid = finished_batch(container, fake, receiver.url)
    results = [sweeper.sweep(container) for _ in range(4)]
    assert [r["webhooks_retrying"] for r in results] == [1, 1, 0, 0]
    assert [r["webhooks_sent"] for r in results] == [0, 0, 1, 0]
    assert len(receiver.received) == 3
    content_type, payload = receiver.received[-1]
    assert content_type == "application/json"
    assert payload["event"] == "batch.completed" and payload["batch_id"] == bid
    assert payload["total"] == 2 and payload["counts"]["completed"] == 2
    assert payload["results_url"].endswith(f"/batch/{bid}/results")
    assert payload["finished_at"]
    hook = batches.progress(container, "default", bid)["webhook"]
    assert (hook["status"], hook["attempts"], hook["last_error"]) == ("delivered", 3, None)


def test_a_webhook_gives_up_after_its_attempts(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 0.0)
    bid = finished_batch(container, fake, "http://127.0.0.1:9/closed-port")
    for _ in range(container.settings.webhook_max_attempts + 2):
        sweeper.sweep(container)
    hook = batches.progress(container, "default", bid)["webhook"]
    assert hook["status"] == "failed" and hook["attempts"] == container.settings.webhook_max_attempts


def test_the_sweeper_finishes_batches_the_worker_did_not(container: Container, fake: FakeProvider) -> None:
    q = make_queue(container, fake.url)
    b = messages.submit(container, "default", {"queue_id": q, "messages": [{"prompt": "a"}]})
    with container.db.tx() as cur:  # as if a worker died after its result and before the check
        cur.execute("UPDATE messages SET status = 'completed' WHERE batch_id = %s", (b["batch_id"],))
    assert batches.progress(container, "default", str(b["batch_id"]))["finished_at"] is None
    assert sweeper.sweep(container)["batches_finished"] == 1
    assert batches.progress(container, "default", str(b["batch_id"]))["finished_at"] is not None
