"""Replay and cancel over the API: a batch cancelled keeps what is done and its webhook says
`cancelled`; failed messages are sent again, and their batch finishes anew with a new event."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.domain import decisions
from ai_rate_limiter.services import invocation, sweeper

from tests.conftest import FakeProvider

from .conftest import Api, assert_problem, make_queue, take_event
from .webhook_receiver import Hook


def batch_of(api: Api, q: str, n: int, webhook_url: str | None = None) -> str:
    body = {"queue_id": q, "messages": [{"prompt": f"p{i}"} for i in range(n)], "webhook_url": webhook_url}
    r = api.call("post", "/message/create", body)
    assert r.status_code == 202, r.body
    return str(r.json["batch_id"])


def run(c: Container, q: str, n: int) -> dict[str, int]:
    return invocation.handle_event(c, take_event(c, q, n), 30)


def split(event: dict[str, Any], n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The event's first n deliveries as one event, the rest as another (an invocation goes on
    reading its queue, so what it must not see is taken off the broker first)."""
    [(key, deliveries)] = event["rmqMessagesByQueue"].items()
    return (
        {**event, "rmqMessagesByQueue": {key: deliveries[:n]}},
        {**event, "rmqMessagesByQueue": {key: deliveries[n:]}},
    )


def events(hook: Hook) -> list[tuple[str, dict[str, object]]]:
    return [(headers["webhook-id"], json.loads(body)) for headers, body in hook.received]


def test_a_cancelled_batch_keeps_what_is_done_and_its_webhook_says_cancelled(
    api: Api, container: Container, fake: FakeProvider, hooks: Callable[..., Hook]
) -> None:
    q = make_queue(container, fake.url)
    hook = hooks(204)
    bid = batch_of(api, q, 5, hook.url)
    first, rest = split(take_event(container, q, 5), 2)
    assert invocation.handle_event(container, first, 30) == {"completed": 2}

    r = api.call("post", f"/batch/{bid}/cancel")

    assert r.status_code == 200, r.body
    assert r.json["status"] == "cancelled" and r.json["cancelled_at"]
    assert (r.json["counts"]["completed"], r.json["counts"]["cancelled"]) == (2, 3)
    assert r.json["finished_at"]  # nothing was in flight: finished at once
    assert invocation.handle_event(container, rest, 30) == {"skipped": 3}  # their copies come to nothing
    assert fake.stats()["total"]["requests"] == 2
    sweeper.sweep(container)
    [(_, payload)] = events(hook)
    assert (payload["event"], payload["status"]) == ("batch.cancelled", "cancelled")
    assert payload["counts"] == {**payload["counts"], "completed": 2, "cancelled": 3}  # type: ignore[dict-item]
    results = api.call("get", f"/batch/{bid}/results").json["results"]
    assert [m["status"] for m in results] == ["completed"] * 2 + ["cancelled"] * 3
    assert results[0]["response"] == "Echo: p0"
    again = api.call("post", f"/batch/{bid}/cancel")  # changes nothing
    assert again.status_code == 200 and again.json["cancelled_at"] == r.json["cancelled_at"]


def test_messages_in_flight_finish_after_their_batch_is_cancelled(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    bid = batch_of(api, q, 4)
    fake.configure(latency_ms=1500, jitter_ms=0)
    event, _ = split(take_event(container, q, 4), 2)
    done: list[dict[str, int]] = []
    worker = threading.Thread(target=lambda: done.append(invocation.handle_event(container, event, 30)))
    worker.start()
    time.sleep(0.7)  # both calls out

    r = api.call("post", f"/batch/{bid}/cancel")

    assert (r.json["counts"]["processing"], r.json["counts"]["cancelled"]) == (2, 2)
    assert r.json["status"] == "cancelled" and r.json["finished_at"] is None
    worker.join(10)
    assert done == [{"completed": 2}]
    b = api.call("get", f"/batch/{bid}").json
    assert (b["counts"]["completed"], b["counts"]["cancelled"], b["status"]) == (2, 2, "cancelled")
    assert b["finished_at"]


def test_a_message_handed_back_after_its_batch_was_cancelled_is_cancelled(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    bid = batch_of(api, q, 1)
    [m] = api.call("get", f"/batch/{bid}/messages").json["messages"]
    [claimed] = container.store.claim([m["message_id"]], 20)
    api.call("post", f"/batch/{bid}/cancel")
    assert container.store.release(claimed, "no slot in time")  # deferred: it would come back
    assert api.call("get", f"/message/read/{m['message_id']}").json["status"] == "cancelled"
    assert run(container, q, 1) == {"skipped": 1}
    assert fake.stats()["total"]["requests"] == 0


def test_a_finished_batch_cannot_be_cancelled(api: Api, container: Container, fake: FakeProvider) -> None:
    q = make_queue(container, fake.url)
    bid = batch_of(api, q, 1)
    run(container, q, 1)
    assert_problem(api.call("post", f"/batch/{bid}/cancel"), 409, "finished")
    assert api.call("get", f"/batch/{bid}").json["status"] == "completed"
    assert_problem(api.call("post", "/batch/7d6f3b2e-1c4a-4e5f-9a8b-0c1d2e3f4a5b/cancel"), 404)
    assert_problem(api.call("post", "/batch/not-an-id/cancel"), 404)


def test_failed_messages_are_sent_again_and_the_batch_finishes_anew(
    api: Api,
    container: Container,
    fake: FakeProvider,
    hooks: Callable[..., Hook],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decisions, "backoff_s", lambda attempt, **kw: 0.01)
    monkeypatch.setattr(container, "settings", replace(container.settings, max_attempts=2))
    q = make_queue(container, fake.url)
    hook = hooks(204)
    bid = batch_of(api, q, 2, hook.url)
    fake.configure(error_rate=1.0)
    assert run(container, q, 2) == {"dead_lettered": 2}
    sweeper.sweep(container)
    fake.configure(error_rate=0.0)

    r = api.call("post", f"/batch/{bid}/retry-failed")

    assert r.status_code == 202, r.body
    assert (r.json["requeued"], r.json["status"]) == (2, "queued")
    assert api.call("get", f"/batch/{bid}").json["finished_at"] is None
    assert run(container, q, 2) == {"completed": 2}
    sweeper.sweep(container)
    for m in api.call("get", f"/batch/{bid}/messages").json["messages"]:
        assert (m["status"], m["attempts"], m["dead_lettered"], m["last_error"]) == (
            "completed",
            1,
            False,
            None,
        )
    (first_id, first), (second_id, second) = events(hook)
    assert first["counts"]["failed"] == 2 and second["counts"]["completed"] == 2  # type: ignore[index]
    assert second_id == first_id + "_2"
    assert api.call("post", f"/batch/{bid}/retry-failed").json["requeued"] == 0


def test_a_failed_or_cancelled_message_is_sent_again(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    mid = api.call("post", "/message/create", {"queue_id": q, "prompt": "again"}).json["message_id"]
    assert api.call("delete", f"/message/delete/{mid}").json["status"] == "cancelled"
    take_event(container, q, 1)  # its first copy, come to nothing

    r = api.call("post", f"/message/{mid}/retry")

    assert (r.status_code, r.json) == (202, {"message_id": mid, "status": "queued"})
    assert run(container, q, 1) == {"completed": 1}
    assert api.call("get", f"/message/read/{mid}").json["response"] == "Echo: again"
    assert_problem(api.call("post", f"/message/{mid}/retry"), 409, "completed")
    assert_problem(api.call("post", "/message/7d6f3b2e-1c4a-4e5f-9a8b-0c1d2e3f4a5b/retry"), 404)


def test_a_message_of_a_cancelled_batch_is_not_sent_again(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    bid = batch_of(api, q, 1)
    api.call("post", f"/batch/{bid}/cancel")
    [m] = api.call("get", f"/batch/{bid}/messages").json["messages"]
    assert_problem(api.call("post", f"/message/{m['message_id']}/retry"), 409, "cancelled")
    assert api.call("get", f"/message/read/{m['message_id']}").json["status"] == "cancelled"
