"""Batch completion and webhook delivery, with a real HTTP receiver on loopback."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from ai_rate_limiter.adapters.webhooks import new_secret, verify
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.services import batches, endpoints, invocation, messages, sweeper
from chalice.test import Client

from tests.conftest import FakeProvider, Receiver

from .conftest import Api, app_on, finished_batch, make_queue, submitted_batch, take_event
from .webhook_receiver import Hook


def hook_state(c: Container, batch_id: str) -> tuple[str, int, str | None]:
    hook = batches.progress(c, "default", batch_id)["webhook"]
    return hook["status"], hook["attempts"], hook["last_error"]


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


def test_one_sweep_finishes_every_batch_that_is_done_however_many_are_still_running(
    container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    """Older batches still running never hold back newer ones that are done; each finished one
    gets its deliveries to the tenant's endpoints."""
    hook = hooks(204)
    endpoints.create(container, "default", {"url": hook.url})
    q = make_queue(container, fake.url)
    with container.db.tx() as cur:  # 600 older batches, each with a message still queued
        cur.execute(
            """WITH b AS (
                   INSERT INTO batches (id, queue_id, total, created_at)
                   SELECT gen_random_uuid(), %(q)s, 1, now() - interval '1 hour' FROM generate_series(1, 600)
                   RETURNING id)
               INSERT INTO messages (id, queue_id, batch_id, request, relay_after)
               SELECT gen_random_uuid(), %(q)s, b.id, '{"messages": []}', NULL FROM b""",
            {"q": q},
        )
    done = [
        messages.submit(container, "default", {"queue_id": q, "messages": [{"prompt": f"d{i}"}]})["batch_id"]
        for i in range(3)
    ]
    with container.db.tx() as cur:  # as if their workers died after the results
        cur.execute("UPDATE messages SET status = 'completed' WHERE batch_id = ANY(%s::uuid[])", (done,))
    assert sweeper.sweep(container)["batches_finished"] == 3
    assert sweeper.sweep(container)["batches_finished"] == 0
    with container.db.tx() as cur:
        cur.execute("SELECT count(*) AS n FROM webhook_deliveries WHERE batch_id = ANY(%s::uuid[])", (done,))
        assert cur.fetchone()["n"] == 3


def test_every_delivery_is_signed_with_the_batchs_secret_and_a_retry_keeps_its_id(
    container: Container, fake: FakeProvider, hooks: Callable[..., Hook], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 0.0)
    hook = hooks(500, 204)
    b = submitted_batch(container, fake, hook.url)
    bid, secret = str(b["batch_id"]), b["webhook_secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    sweeper.sweep(container)
    sweeper.sweep(container)
    assert hook_state(container, bid) == ("delivered", 2, None)
    assert hook.ids() == ["msg_" + bid.replace("-", "")] * 2
    stamps = []
    for headers, body in hook.received:
        assert headers["content-type"] == "application/json"
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 30
        stamps.append(int(headers["webhook-timestamp"]))
        assert headers["webhook-signature"].startswith("v1,")
        assert verify(secret, headers, body)
        assert not verify(new_secret(), headers, body)
        assert not verify(secret, headers, body.replace(b"completed", b"cancelled"))
        assert json.loads(body)["batch_id"] == bid
        assert secret not in body.decode() and secret not in json.dumps(headers)
    assert stamps == sorted(stamps)


def test_the_secret_is_in_the_202_answer_and_nowhere_else(
    container: Container,
    fake: FakeProvider,
    hooks: Callable[..., Hook],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    hook = hooks(500, 500, 204)  # both batches' webhooks fail once, then arrive
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 0.0)
    q = make_queue(container, fake.url)
    with Client(app_on(container, monkeypatch)) as client:
        api = Api(client, container.settings.admin_api_key)

        def create(body: dict[str, Any]) -> dict[str, Any]:
            r = api.call("post", "/message/create", body)
            assert r.status_code == 202, r.body
            answer: dict[str, Any] = r.json
            return answer

        plain = create({"queue_id": q, "messages": [{"prompt": "a"}]})
        assert "webhook_secret" not in plain
        first = create(
            {"queue_id": q, "webhook_url": hook.url, "messages": [{"prompt": "a"}, {"prompt": "b"}]}
        )
        second = create({"queue_id": q, "webhook_url": hook.url, "messages": [{"prompt": "c"}]})
        secret, bid = first["webhook_secret"], first["batch_id"]
        assert secret.startswith("whsec_") and second["webhook_secret"] != secret
        invocation.handle_event(container, take_event(container, q, 4), 30)
        sweeper.sweep(container)
        sweeper.sweep(container)
        seen = [
            api.call("get", path).body.decode()
            for path in (
                f"/batch/{bid}",
                f"/batch/{bid}/messages",
                f"/batch/{bid}/results",
                f"/batch/{bid}/results?format=csv",
            )
        ]
    assert json.loads(seen[0])["webhook"]["status"] == "delivered"
    assert len(hook.received) == 4
    seen += [body.decode() + json.dumps(headers) for headers, body in hook.received]
    seen += [r.getMessage() + repr(r.args) for r in caplog.records]
    for text in seen:
        assert secret not in text and secret[6:] not in text and "webhook_secret" not in text
    with container.db.tx() as cur:  # stored sealed, for this batch alone
        cur.execute("SELECT webhook_secret FROM batches WHERE id = %s", (bid,))
        stored = cur.fetchone()["webhook_secret"]
    assert stored.startswith("sealed1$") and secret not in stored and secret[6:] not in stored


def test_a_batch_stored_without_a_secret_is_delivered_unsigned(
    container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    hook = hooks(204)
    bid = finished_batch(container, fake, hook.url)
    with container.db.tx() as cur:  # as a batch stored before migration 0004
        cur.execute("UPDATE batches SET webhook_secret = NULL WHERE id = %s", (bid,))
    assert sweeper.sweep(container)["webhooks_sent"] == 1
    [(headers, _)] = hook.received
    assert headers["webhook-id"] == "msg_" + bid.replace("-", "") and headers["webhook-timestamp"]
    assert "webhook-signature" not in headers


def test_a_410_turns_the_webhook_off_for_good(
    container: Container, fake: FakeProvider, hooks: Callable[..., Hook], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 0.0)
    hook = hooks(410, 204)
    bid = finished_batch(container, fake, hook.url)
    assert sweeper.sweep(container)["webhooks_failed"] == 1
    for _ in range(3):
        assert sweeper.sweep(container)["webhooks_sent"] == 0
    assert len(hook.received) == 1
    assert hook_state(container, bid) == ("failed", 1, "endpoint gone (410)")


def test_a_receiver_that_dribbles_its_answer_is_cut_off_at_the_timeout_and_retried_later(
    container: Container, fake: FakeProvider, hooks: Callable[..., Hook], monkeypatch: pytest.MonkeyPatch
) -> None:
    timeout = container.settings.webhook_timeout_s
    hook = hooks("drip", 204)
    bid = finished_batch(container, fake, hook.url)
    start = time.monotonic()
    assert sweeper.sweep(container)["webhooks_retrying"] == 1
    took = time.monotonic() - start
    assert timeout - 0.1 <= took < timeout + 1.0  # each read was quick: only the total ran out
    assert hook_state(container, bid) == ("pending", 1, f"no answer within {timeout:g} s")
    deadline = time.monotonic() + 2
    while not hook.held_s and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hook.held_s and hook.held_s[0] < timeout + 1.0  # the connection was cut, not left open
    assert sweeper.sweep(container)["webhooks_sent"] == 0  # not due yet: it waits its backoff
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 0.0)
    with container.db.tx() as cur:
        cur.execute("UPDATE batches SET webhook_next_at = now() WHERE id = %s", (bid,))
    assert sweeper.sweep(container)["webhooks_sent"] == 1
    assert hook_state(container, bid) == ("delivered", 2, None)
    assert len(set(hook.ids())) == 1 and len(hook.received) == 2


def test_two_sweeps_at_once_deliver_a_webhook_once(
    container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    hook = hooks(("slow", 1.5))
    bid = finished_batch(container, fake, hook.url)
    start = threading.Barrier(3)
    results: list[dict[str, int]] = []

    def sweep() -> None:
        start.wait()
        results.append(sweeper.sweep(container))

    threads = [threading.Thread(target=sweep) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(r["webhooks_sent"] for r in results) == [0, 0, 1]
    assert len(hook.received) == 1 and hook.most_active == 1
    assert hook_state(container, bid) == ("delivered", 1, None)


def test_a_receiver_slower_than_the_lease_never_has_the_same_delivery_twice_at_once(
    container: Container, fake: FakeProvider, hooks: Callable[..., Hook], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lease 4 s for a 3 s deadline; the receiver would hold each delivery for 30 s. Sweepers keep
    # looking the whole time: a delivery still being sent after its lease would go out twice.
    monkeypatch.setattr(sweeper, "LEASE_MARGIN_S", 1.0)
    monkeypatch.setattr(sweeper, "RESULT_MARGIN_S", 0.5)
    monkeypatch.setattr(sweeper, "webhook_retry_s", lambda attempts: 1.0)
    timeout = container.settings.webhook_timeout_s
    hook = hooks("drip")
    bid = finished_batch(container, fake, hook.url)
    until = time.monotonic() + 2 * timeout
    outcomes: list[dict[str, int]] = []

    def keep_sweeping() -> None:
        while time.monotonic() < until:
            outcomes.append(sweeper.deliver_webhooks(container))
            time.sleep(0.05)

    threads = [threading.Thread(target=keep_sweeping) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * timeout)
    time.sleep(0.3)
    assert hook.most_active == 1
    assert len(hook.received) == 2 and len(set(hook.ids())) == 1  # cut at 3 s, again at 4 s
    assert all(held < timeout + 0.5 for held in hook.held_s)
    assert sum(o["webhooks_retrying"] for o in outcomes) == 2
    assert hook_state(container, bid) == ("pending", 2, f"no answer within {timeout:g} s")


def test_a_result_written_after_its_lease_ran_out_cannot_overwrite_a_newer_attempt(
    container: Container, fake: FakeProvider
) -> None:
    bid = finished_batch(container, fake, "http://127.0.0.1:9/unused")
    store = container.store
    [first] = store.take_due_webhooks(5, lease_s=60)
    assert first["webhook_attempts"] == 1 and first["webhook_secret"].startswith("sealed1$")
    assert store.take_due_webhooks(5, lease_s=60) == []  # leased: nobody else takes it
    with container.db.tx() as cur:  # the lease runs out while attempt 1 is still out there
        cur.execute("UPDATE batches SET webhook_next_at = now() - interval '1 second' WHERE id = %s", (bid,))
    [second] = store.take_due_webhooks(5, lease_s=60)
    assert second["webhook_attempts"] == 2
    assert not store.webhook_result(bid, 1, "delivered", None, 0)  # attempt 1's late answer
    assert hook_state(container, bid) == ("pending", 2, None)
    assert store.webhook_result(bid, 2, "failed", "endpoint gone (410)", 0)
    assert not store.webhook_result(bid, 2, "delivered", None, 0)  # a finished webhook stays so
    assert hook_state(container, bid) == ("failed", 2, "endpoint gone (410)")


def test_a_webhook_secret_that_cannot_be_opened_sends_nothing_unsigned(
    container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    hook = hooks(204)
    bid = finished_batch(container, fake, hook.url)
    with container.db.tx() as cur:  # tampered with at rest
        cur.execute(
            "UPDATE batches SET webhook_secret = webhook_secret || 'x' WHERE id = %s"
            " RETURNING webhook_secret",
            (bid,),
        )
        assert cur.fetchone()["webhook_secret"].startswith("sealed1$")
    assert sweeper.sweep(container)["webhooks_retrying"] == 1
    assert hook.received == []
    status, attempts, error = hook_state(container, bid)
    assert (status, attempts) == ("pending", 1) and error and "cannot be decrypted" in error
