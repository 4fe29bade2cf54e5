"""Never submitted twice, never stranded: a submission stands once its rows are committed (a
publish that fails, or is cut short, after the commit is finished by the sweeper's relay, and
each prompt is still answered once), and an Idempotency-Key makes a retried request one
submission."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.domain.schemas import MessageFields, parse
from ai_rate_limiter.errors import DependencyUnavailable, NotFound
from ai_rate_limiter.services import dispatch, invocation, messages, sweeper
from chalice.test import Client

from tests.conftest import CLOSED_PORT, FakeProvider

from .conftest import JSON, Api, app_on, assert_problem, count_rows, make_queue, take_event

T = "default"


def to_relay(c: Container, batch_id: str) -> tuple[bool, int]:
    """Whether the batch is still to be relayed as a whole, and how many of its messages are,
    each on its own (handed back by a deferral)."""
    with c.db.tx() as cur:
        cur.execute(
            """SELECT (SELECT relay_after IS NOT NULL FROM batches WHERE id = %(b)s) AS whole,
                      (SELECT count(*) FROM messages
                       WHERE batch_id = %(b)s AND relay_after IS NOT NULL) AS n""",
            {"b": batch_id},
        )
        row = cur.fetchone()
        return bool(row["whole"]), int(row["n"])


def due(c: Container) -> None:
    """As if the relay's wait (longer than an API function runs) had passed."""
    with c.db.tx() as cur:
        for table in ("messages", "batches"):
            cur.execute(
                f"UPDATE {table} SET relay_after = now() - interval '1 second' WHERE relay_after IS NOT NULL"
            )


def failing_publish(c: Container, monkeypatch: pytest.MonkeyPatch, fails: Callable[[str], bool]) -> None:
    """The broker refuses the publishes to the queues `fails` names, once each."""
    real = c.broker.publish
    refused: set[str] = set()

    def publish(queue: str, bodies: list[bytes]) -> None:
        if fails(queue) and queue not in refused:
            refused.add(queue)
            raise DependencyUnavailable("rabbitmq: connection reset")
        real(queue, bodies)

    monkeypatch.setattr(c.broker, "publish", publish)


def submit(c: Container, q: str, n: int) -> dict[str, Any]:
    return messages.submit(c, T, {"queue_id": q, "messages": [{"prompt": f"p{i}"} for i in range(n)]})


def run_queue(c: Container, q: str) -> None:
    invocation.handle_event(c, take_event(c, q, 1), 30)


def counts(c: Container, batch_id: str) -> dict[str, int]:
    return c.store.batch_counts(batch_id)


def test_a_submission_whose_publish_fails_after_the_commit_stands_and_is_relayed(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(container, fake.url)
    failing_publish(container, monkeypatch, lambda queue: True)
    b = submit(container, q, 3)  # no error: the rows are committed
    assert b["status"] == "queued" and to_relay(container, b["batch_id"]) == (True, 0)
    assert container.broker.ready(container.names(T, q).main) == 0
    assert sweeper.sweep(container)["relayed"] == 0  # not yet: the API's own publish may still run
    due(container)
    assert sweeper.sweep(container)["relayed"] == 3
    assert to_relay(container, b["batch_id"]) == (False, 0) and sweeper.sweep(container)["relayed"] == 0
    run_queue(container, q)
    assert counts(container, b["batch_id"]) == {"completed": 3}
    assert fake.stats()["total"]["requests"] == 3


def test_committed_rows_that_never_reached_the_broker_are_relayed(
    container: Container, fake: FakeProvider
) -> None:
    """As if the process had died between its commit and its publish."""
    q = make_queue(container, fake.url)
    batch = {"id": str(uuid.uuid4()), "queue_id": q, "total": 2, "webhook_url": None, "webhook_event": None}
    rows = [
        messages.message_row(q, parse(MessageFields, {"prompt": p}), batch["id"], i)
        for i, p in enumerate("ab")
    ]
    container.store.insert_messages(T, batch, rows)
    due(container)
    assert sweeper.sweep(container)["relayed"] == 2
    run_queue(container, q)
    assert counts(container, batch["id"]) == {"completed": 2}


def test_a_publish_cut_short_is_finished_and_each_prompt_is_answered_once(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards: the first is published and confirmed, the second is refused. The relay
    publishes the batch's queued messages again, the first shard's too: each is claimed once."""
    q = make_queue(container, fake.url, workers=2)
    second = container.names(T, q).shard(1)
    failing_publish(container, monkeypatch, lambda queue: queue == second)
    b = submit(container, q, 6)
    assert to_relay(container, b["batch_id"]) == (True, 0)
    due(container)
    assert sweeper.sweep(container)["relayed"] == 6
    run_queue(container, q)  # the invocation goes on to the queue's other shard
    assert counts(container, b["batch_id"]) == {"completed": 6}
    assert fake.stats()["total"]["requests"] == 6


def test_a_broker_queue_that_has_gone_is_declared_again_by_the_relay(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    container.broker.delete(container.names(T, q))  # the broker lost it
    b = submit(container, q, 2)
    due(container)
    assert sweeper.sweep(container)["relayed"] == 2
    run_queue(container, q)
    assert counts(container, b["batch_id"]) == {"completed": 2}


def test_a_cancelled_message_is_not_relayed(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(container, fake.url)
    failing_publish(container, monkeypatch, lambda queue: True)
    single = messages.submit(container, T, {"queue_id": q, "prompt": "x"})
    assert messages.delete(container, T, single["message_id"])["status"] == "cancelled"
    due(container)
    assert sweeper.sweep(container)["relayed"] == 0


# -- Idempotency-Key ------------------------------------------------------------------------------


@pytest.fixture()
def api(container: Container, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    with Client(app_on(container, monkeypatch)) as client:
        yield Api(client, container.settings.admin_api_key)


def post(api: Api, body: dict[str, Any], key: str) -> Any:
    return api.call("post", "/message/create", body, headers={**JSON, "Idempotency-Key": key})


def test_the_same_key_and_body_answer_what_the_first_did_and_store_nothing_more(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    body = {"queue_id": q, "webhook_url": f"http://{CLOSED_PORT}/h", "messages": [{"prompt": "a"}]}
    first = post(api, body, "order-1")
    assert first.status_code == 202
    before = count_rows(container)
    again = post(api, dict(reversed(body.items())), "order-1")  # the same body, keys in another order
    assert again.status_code == 202 and again.json == first.json  # its webhook secret included
    assert count_rows(container) == before
    single = post(api, {"queue_id": q, "prompt": "x"}, "order-2")
    assert post(api, {"queue_id": q, "prompt": "x"}, "order-2").json == single.json
    assert post(api, body, "order-3").json["batch_id"] != first.json["batch_id"]  # a new key: new work
    with container.db.tx() as cur:  # the answer is kept sealed: it holds the webhook secret
        cur.execute("SELECT answer FROM idempotency_keys WHERE key = 'order-1'")
        assert first.json["webhook_secret"] not in cur.fetchone()["answer"]


def test_the_same_key_with_another_body_is_refused_and_changes_nothing(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    assert post(api, {"queue_id": q, "prompt": "a"}, "k").status_code == 202
    before = count_rows(container)
    r = post(api, {"queue_id": q, "prompt": "b"}, "k")
    assert_problem(r, 422, "Idempotency-Key")
    for bad in ("", "x" * 256, "caf\u00e9"):
        assert_problem(post(api, {"queue_id": q, "prompt": "b"}, bad), 422, "Idempotency-Key")
    assert count_rows(container) == before


def test_a_key_is_its_tenants_own_and_free_again_once_expired(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    first = messages.submit(container, T, {"queue_id": q, "prompt": "a"}, "k")
    with container.db.tx() as cur:
        cur.execute("UPDATE idempotency_keys SET created_at = now() - interval '2 days'")
    assert messages.submit(container, T, {"queue_id": q, "prompt": "b"}, "k") != first  # expired
    with container.db.tx() as cur:
        cur.execute("UPDATE idempotency_keys SET created_at = now() - interval '2 days'")
    sweeper.sweep(container)  # expired keys are forgotten
    with container.db.tx() as cur:
        cur.execute("SELECT count(*) AS n FROM idempotency_keys")
        assert cur.fetchone()["n"] == 0
    other = api.call("post", "/admin/tenants", {"name": "other"}).json
    theirs = Api(api.client, other["api_key"])
    r = post(theirs, {"queue_id": q, "prompt": "a"}, "k")  # their key "k" is not ours: and no queue q
    assert_problem(r, 404)


def test_two_requests_with_one_key_at_once_make_one_submission(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    body = {"queue_id": q, "messages": [{"prompt": f"p{i}"} for i in range(200)]}
    start = threading.Barrier(4)
    answers: list[dict[str, Any]] = []

    def send() -> None:
        start.wait()
        answers.append(messages.submit(container, T, body, "same"))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 4 and len({a["batch_id"] for a in answers}) == 1
    with container.db.tx() as cur:
        cur.execute("SELECT count(*) AS n FROM messages WHERE queue_id = %s", (q,))
        assert cur.fetchone()["n"] == 200


def test_a_deferral_whose_delayed_copy_never_reaches_the_broker_is_relayed(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(container, fake.url)
    b = submit(container, q, 1)
    take_event(container, q, 1)  # the broker's copy, taken
    ids = [r["id"] for r in container.store.batch_page(T, b["batch_id"], -1, 5, "id::text AS id")]
    [m] = container.store.claim(ids, 60)

    def refused(*args: object) -> None:
        raise NotFound("The delay queue does not exist.")

    monkeypatch.setattr(container.broker, "publish_delayed", refused)
    dispatch.defer(container, m, 30, "no slot in time")  # logged: the relay's now
    monkeypatch.undo()
    assert to_relay(container, b["batch_id"]) == (False, 1)  # queued, with no copy anywhere: the relay's
    due(container)
    assert sweeper.sweep(container)["relayed"] == 1
    run_queue(container, q)
    assert counts(container, b["batch_id"]) == {"completed": 1}


def test_a_message_published_but_not_marked_is_answered_once_and_left_alone_by_the_relay(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(container, fake.url)

    def mark_lost(ids: object) -> None:
        raise DependencyUnavailable("postgres: connection reset")

    monkeypatch.setattr(container.store, "batch_published", mark_lost)
    b = submit(container, q, 2)  # on the broker, but not marked so
    monkeypatch.undo()
    run_queue(container, q)
    assert counts(container, b["batch_id"]) == {"completed": 2}
    due(container)
    assert sweeper.sweep(container)["relayed"] == 0  # answered: nothing to relay
    assert to_relay(container, b["batch_id"]) == (False, 0)
    assert fake.stats()["total"]["requests"] == 2
