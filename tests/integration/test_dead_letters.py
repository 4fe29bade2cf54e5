"""Tries counted across deliveries, and dead letters: a message that kills its worker, one the
broker gives up on, one whose every copy is gone; a body that is no message; a Postgres blip
while messages are claimed. Against Postgres, RabbitMQ and the fake provider."""

from __future__ import annotations

import base64
from typing import Any

import pika
import pytest
from ai_rate_limiter.adapters.rabbitmq import connection_parameters
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.errors import DependencyUnavailable
from ai_rate_limiter.services import dispatch, invocation, messages, processing, sweeper

from tests.conftest import FakeProvider

from .conftest import make_queue, take_event

T = "default"


def submit(c: Container, queue_id: str, prompt: str) -> str:
    return str(messages.submit(c, T, {"queue_id": queue_id, "prompt": prompt})["message_id"])


def row(c: Container, mid: str) -> dict[str, Any]:
    return messages.read(c, T, mid)


def set_row(c: Container, mid: str, assignments: str) -> None:
    with c.db.tx() as cur:
        cur.execute(f"UPDATE messages SET {assignments} WHERE id = %s", (mid,))


def dead_copies(c: Container, queue_id: str) -> list[tuple[str | None, str]]:
    """What the queue's dead-letter queue holds, (message id, why), left there as it was."""
    name = c.names(T, queue_id).dead
    conn = pika.BlockingConnection(connection_parameters(c.settings.rabbitmq_url))
    try:
        ch = conn.channel()
        found = []
        while (got := ch.basic_get(name, auto_ack=False))[0] is not None:
            _, props, body = got
            why = (props.headers or {}).get("x-why", b"")
            found.append((dispatch.message_id_of(body), why.decode() if isinstance(why, bytes) else str(why)))
        return found
    finally:
        conn.close()  # what was taken goes back


def test_a_body_that_is_no_message_fails_none_of_its_neighbours(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    submit(container, q, "fine")
    event = take_event(container, q, 1)
    [deliveries] = event["rmqMessagesByQueue"].values()
    for body in (b'{"message_id": 123}', b'{"message_id": ["x"]}', b"[]"):
        deliveries.insert(0, {**deliveries[0], "data": base64.b64encode(body).decode()})
    assert invocation.handle_event(container, event, 30) == {"completed": 1, "malformed": 3}


def test_a_message_whose_leases_keep_running_out_is_dead_lettered(
    container: Container, fake: FakeProvider
) -> None:
    """The message that kills its worker: each lease ends with no outcome, and each counts."""
    q = make_queue(container, fake.url)
    mid = submit(container, q, "poison")
    n = container.settings.max_attempts
    for _ in range(n):  # claimed, and its worker dies holding it
        assert len(container.store.claim([mid], lease_s=processing.LEASE_S)) == 1
        set_row(container, mid, "lease_until = now() - interval '1 ms'")
    assert invocation.handle_event(container, take_event(container, q, 1), 30) == {"dead_lettered": 1}
    m = row(container, mid)
    assert (m["status"], m["dead_lettered"], m["attempts"]) == ("failed", True, n)
    assert m["last_error"] == f"gave up after {n} attempts: no attempt ended with an outcome"
    assert fake.stats()["total"]["requests"] == 0
    assert dead_copies(container, q) == [(mid, m["last_error"])]  # it ends in the dead-letter queue


def test_dead_letters_from_the_broker_go_back_to_their_queue_or_are_marked(
    container: Container, fake: FakeProvider
) -> None:
    """The broker dead-letters a message delivered too often without an outcome (an event that
    failed again and again): the sweeper counts the try and queues it again, or, with no try
    left, fails it and says why. Nothing stays in the dead-letter queue."""
    q = make_queue(container, fake.url)
    names = container.names(T, q)
    fresh, spent, done = (submit(container, q, p) for p in ("fresh", "spent", "done"))
    invocation.handle_event(container, take_event(container, q, 3), 30)  # all three complete ...
    for mid in (fresh, spent):  # ... but say only `done` had: the others are still to do
        set_row(container, mid, "status = 'queued', response_text = NULL, tries = 0")
    set_row(container, spent, f"tries = {container.settings.max_attempts - 1}, last_error = 'HTTP 500'")
    container.broker.publish(names.dead_letter, [dispatch.message_body(T, m) for m in (fresh, spent, done)])

    out = sweeper.sweep(container)

    assert (out["requeued"], out["dead_lettered"], out["relayed"]) == (1, 1, 1)
    assert container.broker.ready(names.dead_letter) == 0
    gave_up = f"gave up after {container.settings.max_attempts} attempts: HTTP 500"
    assert dead_copies(container, q) == [(spent, gave_up)]  # only what its row says is dead
    assert (row(container, fresh)["status"], row(container, fresh)["attempts"]) == ("queued", 1)
    m = row(container, spent)
    assert (m["status"], m["dead_lettered"], m["attempts"]) == (
        "failed",
        True,
        container.settings.max_attempts,
    )
    assert m["last_error"] == f"gave up after {container.settings.max_attempts} attempts: HTTP 500"
    assert row(container, done)["status"] == "completed"
    assert invocation.handle_event(container, take_event(container, q, 1), 30) == {"completed": 1}
    assert row(container, fresh)["status"] == "completed"


def test_a_lease_nobody_takes_over_is_queued_again_by_the_sweeper(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    mid = submit(container, q, "orphan")
    take_event(container, q, 1)  # its copy is gone with the worker that claimed it
    container.store.claim([mid], lease_s=processing.LEASE_S)
    set_row(container, mid, "lease_until = now() - make_interval(secs => 1)")
    assert sweeper.sweep(container)["requeued"] == 0  # a redelivered copy may still take it over
    set_row(container, mid, f"lease_until = now() - make_interval(secs => {sweeper.ORPHANED_S + 1})")

    out = sweeper.sweep(container)

    assert (out["requeued"], out["relayed"]) == (1, 1)
    assert invocation.handle_event(container, take_event(container, q, 1), 30) == {"completed": 1}
    assert row(container, mid)["attempts"] == 2  # the lost lease and the call


def test_a_postgres_blip_while_claiming_is_waited_out(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(container, fake.url)
    mid = submit(container, q, "blip")
    real, calls = container.store.claim, []

    def blipping(ids: Any, lease_s: float, token: str | None = None) -> Any:
        calls.append(ids)
        if len(calls) <= 2:
            raise DependencyUnavailable("postgres: connection refused")
        return real(ids, lease_s, token)

    monkeypatch.setattr(container.store, "claim", blipping)
    assert invocation.handle_event(container, take_event(container, q, 1), 30) == {"completed": 1}
    assert len(calls) == 3 and row(container, mid)["attempts"] == 1


def test_a_claim_that_stays_down_fails_the_event_and_releases_nothing_it_did_not_claim(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(container, fake.url)
    mid = submit(container, q, "down")
    monkeypatch.setattr(invocation, "CLAIM_RETRY_S", 0.5)

    def down(ids: Any, lease_s: float, token: str | None = None) -> Any:
        raise DependencyUnavailable("postgres: connection refused")

    monkeypatch.setattr(container.store, "claim", down)
    with pytest.raises(DependencyUnavailable):
        invocation.handle_event(container, take_event(container, q, 1), 30)
    assert row(container, mid)["status"] == "queued"


def test_a_claim_tried_again_with_its_token_returns_what_it_took_and_takes_nothing_held(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    ids = [submit(container, q, p) for p in "ab"]
    token = "00000000-0000-4000-8000-00000000000a"
    [first] = container.store.claim(ids[:1], 20.0, token)
    again = container.store.claim(ids, 20.0, token)
    assert sorted(m.id for m in again) == sorted(ids)
    assert [(m.attempt, m.tries) for m in again if m.id == first.id] == [(first.attempt, first.tries)]
    assert container.store.claim(ids, 20.0) == []  # another claim: both are held
    set_row(container, ids[0], "lease_until = now() - interval '1 second'")
    [taken] = container.store.claim(ids, 20.0)  # the lease ran out: another claim takes it over
    assert (taken.id, taken.attempt, taken.tries) == (ids[0], first.attempt + 1, first.tries + 1)
    assert container.store.claim(ids, 20.0, token) == [
        m for m in again if m.id == ids[1]
    ]  # the first claim keeps only what is still its own


def test_a_release_tried_again_after_its_reply_was_lost_still_leads_to_its_publish(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    mid = submit(container, q, "later")
    [m] = container.store.claim([mid], 20.0)
    assert container.store.release(m, "deferred")
    assert container.store.release(m, "deferred")  # its copy is still to be published
    container.store.published([mid])
    assert not container.store.release(m, "deferred")  # published: nothing more to do
    [taken] = container.store.claim([mid], 20.0)
    assert not container.store.release(m, None) and container.store.release(taken, None)


def test_a_replayed_message_leaves_the_dead_letter_queue_and_the_others_stay(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    ids = [submit(container, q, p) for p in ("again", "stays")]
    n = container.settings.max_attempts
    for mid in ids:
        set_row(container, mid, f"tries = {n}, status = 'processing', lease_until = now() - interval '1 ms'")
    assert invocation.handle_event(container, take_event(container, q, 2), 30) == {"dead_lettered": 2}
    assert sorted(mid for mid, _ in dead_copies(container, q)) == sorted(ids)

    messages.retry(container, T, ids[0])

    assert [mid for mid, _ in dead_copies(container, q)] == [ids[1]]
    assert row(container, ids[0])["status"] == "queued" and row(container, ids[1])["dead_lettered"]
