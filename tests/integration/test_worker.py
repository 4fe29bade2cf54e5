"""The worker handler on real events from RabbitMQ, against Postgres, Redis and the fake provider."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from ai_rate_limiter.adapters.postgres import provider_from_row, stored_api_key
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.domain import decisions
from ai_rate_limiter.errors import DependencyUnavailable, LimiterUnavailable
from ai_rate_limiter.services import invocation, messages, processing

from local.functions import load
from tests.conftest import FakeProvider

from .conftest import Context, make_queue, take_event

T = "default"


def submit(c: Container, queue_id: str, *prompts: str) -> list[str]:
    if len(prompts) == 1:
        return [messages.submit(c, T, {"queue_id": queue_id, "prompt": prompts[0]})["message_id"]]
    batch = messages.submit(c, T, {"queue_id": queue_id, "messages": [{"prompt": p} for p in prompts]})
    return [
        m["message_id"]
        for m in __import__("ai_rate_limiter.services.batches", fromlist=["x"]).messages(
            c, T, batch["batch_id"], {}
        )["messages"]
    ]


def parked(c: Container, queue_id: str) -> int:
    """Messages waiting in the queue's delay queues."""
    return sum(c.broker.ready(name) for _, name in c.names(T, queue_id).delays())


def run(c: Container, queue_id: str, n: int) -> dict[str, int]:
    return invocation.handle_event(c, take_event(c, queue_id, n), 30)


@pytest.mark.parametrize("kind", ["openai", "azure", "deepseek", "anthropic", "claude"])
def test_each_provider_type_answers_through_its_sdk(
    container: Container, fake: FakeProvider, kind: str
) -> None:
    extra = {
        "provider_type": kind,
        "config": {
            "endpoint": fake.url,
            "deployment": "gpt4o-dep",
            "api_version": "2024-10-21",
            "max_tokens": 50,
        },
    }
    q = make_queue(container, fake.url, extra)
    [mid] = submit(container, q, f"Hello {kind}")
    assert run(container, q, 1) == {"completed": 1}
    m = messages.read(container, T, mid)
    assert m["status"] == "completed"
    assert m["response"] == f"Echo: Hello {kind}"
    assert m["usage"]["prompt_tokens"] > 0 and m["usage"]["completion_tokens"] > 0
    assert m["provider"]["provider_name"] == "fake" and m["attempts"] == 1
    assert m["latency_ms"] >= 0 and m["finished_at"]
    assert fake.stats()["total"]["ok"] == 1


def test_the_lambda_handler_takes_the_event_and_context(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = load("worker", "worker")
    monkeypatch.setattr(worker, "container", lambda: container)
    q = make_queue(container, fake.url)
    submit(container, q, "a", "b", "c")
    result = worker.handler(take_event(container, q, 3), Context(30))
    assert result["completed"] == 3


def test_the_aws_sample_event_is_handled_without_raising(container: Container) -> None:
    event = json.loads((Path(__file__).parents[1] / "events" / "rmq_sample_event.json").read_text())
    assert invocation.handle_event(container, event, 30) == {"malformed": 1}


def test_a_redelivered_completed_message_is_not_sent_again(container: Container, fake: FakeProvider) -> None:
    q = make_queue(container, fake.url)
    submit(container, q, "once")
    event = take_event(container, q, 1)
    assert invocation.handle_event(container, event, 30)["completed"] == 1
    for m in event["rmqMessagesByQueue"].values():
        m[0]["redelivered"] = True
    assert invocation.handle_event(container, event, 30) == {"skipped": 1}
    assert fake.stats()["total"]["requests"] == 1


def test_a_redelivery_of_a_message_leased_elsewhere_comes_back_before_the_lease_ends(
    container: Container, fake: FakeProvider
) -> None:
    """Its holder may have died: the copy waits in the longest delay queue that ends before
    the lease does (and is parked again while the lease runs), not in one that ends after."""
    q = make_queue(container, fake.url)
    [mid] = submit(container, q, "held")
    event = take_event(container, q, 1)
    container.store.claim([mid], lease_s=18.0)  # another invocation holds it
    assert invocation.handle_event(container, event, 30) == {"skipped": 1, "parked": 1}
    names = container.names(T, q)
    assert [container.broker.ready(name) for _, name in names.delays()] == [0, 1, 0, 0, 0, 0]
    assert fake.stats()["total"]["requests"] == 0


def test_a_claim_whose_reply_was_lost_is_tried_again_and_keeps_what_it_took(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim commits and the connection drops before its reply: tried again, it gets the
    messages it took (not taken for another worker's and parked until their lease ends), each
    under the same attempt, with no try counted."""
    q = make_queue(container, fake.url)
    ids = submit(container, q, "a", "b")
    real, tries = container.store.claim, []

    def lost_reply(ids: Any, lease_s: float, token: str | None = None) -> Any:
        tries.append(token)
        got = real(ids, lease_s, token)
        if len(tries) == 1:
            raise DependencyUnavailable("postgres: server closed the connection unexpectedly")
        return got

    monkeypatch.setattr(container.store, "claim", lost_reply)
    assert run(container, q, 2) == {"completed": 2}
    assert len(tries) == 2 and tries[0] == tries[1] is not None
    assert [(r["attempts"], r["status"]) for r in (messages.read(container, T, i) for i in ids)] == [
        (1, "completed")
    ] * 2
    assert fake.stats()["total"]["requests"] == 2 and parked(container, q) == 0


def test_finishing_a_batch_through_a_postgres_blip_fails_nothing(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The invocation's own bookkeeping blips: it goes on, and the batch is finished once
    Postgres answers again."""
    q = make_queue(container, fake.url)
    ids = submit(container, q, "a", "b", "c")
    real, tried = container.store.finish_batch_if_done, []

    def blipping(batch_id: str) -> bool:
        tried.append(batch_id)
        if len(tried) <= 2:
            raise DependencyUnavailable("postgres: server closed the connection unexpectedly")
        return real(batch_id)

    monkeypatch.setattr(container.store, "finish_batch_if_done", blipping)
    assert run(container, q, 3) == {"completed": 3}
    assert len(tried) >= 3
    batch_id = messages.read(container, T, ids[0])["batch_id"]
    assert container.store.get_batch(T, batch_id)["finished_at"] is not None


def test_a_rejected_request_fails_at_once_with_the_providers_message(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, "http://unused", {"config": {"endpoint": f"{fake.url}/nope"}})
    [mid] = submit(container, q, "x")
    assert run(container, q, 1)["failed"] == 1
    m = messages.read(container, T, mid)
    assert m["status"] == "failed" and m["attempts"] == 1
    assert "HTTP 404" in m["last_error"] and "unknown path" in m["last_error"]


def test_server_errors_are_retried_until_an_answer(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decisions, "backoff_s", lambda attempt, **kw: 0.01)
    monkeypatch.setattr(container, "settings", replace(container.settings, max_attempts=24))
    # Half the calls fail: no failure in 20 first tries has p = 1e-6, and one message failing
    # all 24 tries p = 20 * 6e-8.
    fake.configure(error_rate=0.5)
    q = make_queue(container, fake.url)
    ids = submit(container, q, *[f"p{i}" for i in range(20)])
    assert run(container, q, 20)["completed"] == 20
    stats = fake.stats()["total"]
    assert stats["server_errors"] > 0
    tries = [messages.read(container, T, i)["attempts"] for i in ids]
    assert sum(tries) == stats["requests"]


def test_after_max_attempts_the_message_fails_with_the_last_error(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decisions, "backoff_s", lambda attempt, **kw: 0.01)
    fake.configure(error_rate=1.0)
    q = make_queue(container, fake.url)
    [mid] = submit(container, q, "doomed")
    assert run(container, q, 1) == {"dead_lettered": 1}
    m = messages.read(container, T, mid)
    assert m["attempts"] == container.settings.max_attempts
    assert m["status"] == "failed" and m["dead_lettered"] is True
    assert "gave up after 5 attempts" in m["last_error"] and "HTTP 500" in m["last_error"]


def test_a_429_holds_every_worker_until_the_reset_and_costs_no_attempt(
    container: Container, fake: FakeProvider
) -> None:
    """The fake provider allows 1 request in 3 s but our provider claims 100/s. (3 s: the
    second request leaves within the window even when a busy machine has it late for its
    slot every time, which sends it back for a second.)"""
    q = make_queue(container, fake.url, {"limit": 100})
    key = stored_api_key(container.store.queue_providers(T, q)[0][0])
    fake.configure(keys={key: {"limit": 1, "window": 3.0}})
    started = time.monotonic()
    ids = submit(container, q, "a", "b")
    assert run(container, q, 2)["completed"] == 2
    assert time.monotonic() - started >= 2.9  # the second waited for the window to pass
    assert fake.stats()["keys"][key]["rate_limited"] >= 1
    assert [messages.read(container, T, i)["attempts"] for i in ids] == [1, 1]


def test_headers_saying_nothing_is_left_avoid_the_429(container: Container, fake: FakeProvider) -> None:
    q = make_queue(container, fake.url, {"limit": 100})
    key = stored_api_key(container.store.queue_providers(T, q)[0][0])
    fake.configure(keys={key: {"limit": 2, "window": 1.0}})
    submit(container, q, "a", "b")
    assert run(container, q, 2)["completed"] == 2  # the second answer says: 0 left, reset in ~1 s
    submit(container, q, "c")
    started = time.monotonic()
    assert run(container, q, 1)["completed"] == 1
    assert time.monotonic() - started >= 0.8
    assert fake.stats()["keys"][key]["rate_limited"] == 0


def test_a_provider_out_of_quota_is_stopped_and_reported(container: Container, fake: FakeProvider) -> None:
    from ai_rate_limiter.services import health

    q = make_queue(container, fake.url)
    key = stored_api_key(container.store.queue_providers(T, q)[0][0])
    fake.configure(keys={key: {"quota_exhausted": True}})
    [first, second] = submit(container, q, "a", "b")
    run(container, q, 2)
    assert {messages.read(container, T, i)["status"] for i in (first, second)} == {"failed"}
    assert (
        "insufficient_quota" in messages.read(container, T, first)["last_error"]
        or "quota" in (messages.read(container, T, first)["last_error"])
    )
    assert container.store.queue_providers(T, q)[0][0]["status"] == "quota_exhausted"
    ok, report = health.check(container, T)
    assert ok and report["status"] == "degraded"
    assert [p["provider_name"] for p in report["providers_out_of_quota"]] == ["fake"]
    # Not to anyone without a key, nor to another tenant.
    assert health.check(container, None)[1] == {"status": "ok", "dependencies": report["dependencies"]}
    assert "providers_out_of_quota" not in health.check(container, "t-other")[1]
    submit(container, q, "c")
    assert run(container, q, 1)["failed"] == 1 and fake.stats()["total"]["requests"] <= 2


def test_messages_of_a_provider_out_of_quota_finish_on_the_other(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url, {"provider_name": "dry"}, {"provider_name": "wet"})
    rows = {r["name"]: r for r, _ in container.store.queue_providers(T, q)}
    dry = stored_api_key(rows["dry"])
    fake.configure(keys={dry: {"quota_exhausted": True}})
    ids = submit(container, q, *[f"p{i}" for i in range(6)])
    assert run(container, q, 6) == {"completed": 6}
    assert {messages.read(container, T, i)["provider"]["provider_name"] for i in ids} == {"wet"}
    assert {r["name"]: r["status"] for r, _ in container.store.queue_providers(T, q)} == {
        "dry": "quota_exhausted",
        "wet": "active",
    }


def test_the_quota_status_is_not_written_over_a_key_replaced_since(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    [(row, weight)] = container.store.queue_providers(T, q)
    loaded = provider_from_row(row, weight)
    container.store.update_provider(T, loaded.id, {"api_key": "sk-a-new-key-000000000000"})
    assert not container.store.set_provider_status(loaded.id, "quota_exhausted", "late", loaded.version)
    assert container.store.queue_providers(T, q)[0][0]["status"] == "active"
    fresh = provider_from_row(container.store.queue_providers(T, q)[0][0])
    assert container.store.set_provider_status(fresh.id, "quota_exhausted", "now", fresh.version)


def test_5xx_moves_the_message_to_another_provider(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(decisions, "backoff_s", lambda attempt, **kw: 0.01)
    dead = {"provider_name": "dead", "config": {"endpoint": "http://127.0.0.1:9"}}
    q = make_queue(container, fake.url, dead, {"provider_name": "alive"})
    ids = submit(container, q, *[f"m{i}" for i in range(6)])
    assert run(container, q, 6)["completed"] == 6
    reads = [messages.read(container, T, i) for i in ids]
    assert {r["provider"]["provider_name"] for r in reads} == {"alive"}
    assert all(r["attempts"] <= 2 for r in reads)


def test_work_that_cannot_start_in_time_is_deferred_not_failed(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url, {"limit": 1, "time_window": 30})
    ids = submit(container, q, "now", "much later")
    result = invocation.handle_event(container, take_event(container, q, 2), 20)
    assert result == {"completed": 1, "deferred": 1}
    statuses = sorted(messages.read(container, T, i)["status"] for i in ids)
    assert statuses == ["completed", "queued"]
    # The deferred one waits in the delay queue, not lost.
    assert parked(container, q) == 1


def test_redis_down_makes_messages_wait_not_fail(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(container, fake.url)
    [mid] = submit(container, q, "wait for redis")

    def down(*_: object, **__: object) -> None:
        raise LimiterUnavailable("redis: connection refused")

    monkeypatch.setattr(container.limiter, "reserve", down)
    assert run(container, q, 1) == {"deferred": 1}
    m = messages.read(container, T, mid)
    assert m["status"] == "queued" and m["attempts"] == 0 and "redis" in m["last_error"]
    assert fake.stats()["total"]["requests"] == 0
    assert parked(container, q) == 1


def test_postgres_down_redelivers_the_whole_batch(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = make_queue(container, fake.url)
    submit(container, q, "x")
    event = take_event(container, q, 1)

    def down(*_: object, **__: object) -> None:
        raise DependencyUnavailable("postgres: connection refused")

    monkeypatch.setattr(container.store, "claim", down)
    with pytest.raises(DependencyUnavailable):
        invocation.handle_event(container, event, 30)


def test_a_token_limit_paces_by_tokens_and_settles_with_reported_usage(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(
        container,
        fake.url,
        {
            "limit": 1000,
            "token_limit": 600,
            "time_window": 1,
            "config": {"endpoint": fake.url, "max_tokens": 40},
        },
    )
    key = stored_api_key(container.store.queue_providers(T, q)[0][0])
    fake.configure(keys={key: {"limit": 1000, "window": 1.0, "token_limit": 600}})
    started = time.monotonic()
    ids = submit(container, q, *[f"Tell me something short about the number {i}" for i in range(30)])
    assert run(container, q, 30)["completed"] == 30
    elapsed = time.monotonic() - started
    # As OpenAI counts them: each prompt plus its max_tokens (40), whatever the answer's length.
    used = sum(messages.read(container, T, i)["usage"]["prompt_tokens"] + 40 for i in ids)
    stats = fake.stats()["keys"][key]
    assert stats["rate_limited"] == 0 and stats["tokens"] == used
    # Tokens, not requests, set the pace: at least the reported usage beyond one window's worth.
    assert elapsed >= (used - 600) / 600 * 0.9


def test_max_concurrency_caps_requests_in_flight(container: Container, fake: FakeProvider) -> None:
    fake.configure(latency_ms=100, jitter_ms=0)
    q = make_queue(container, fake.url, {"provider_type": "deepseek", "max_concurrency": 2})
    key = stored_api_key(container.store.queue_providers(T, q)[0][0])
    submit(container, q, *[f"p{i}" for i in range(8)])
    started = time.monotonic()
    assert run(container, q, 8)["completed"] == 8
    assert fake.stats()["keys"][key]["max_in_flight"] == 2
    assert time.monotonic() - started >= 0.4  # four rounds of two
    assert container.limiter.client.zcard(f"airl:lim:{provider_from_key(container, q)}:conc") == 0


def provider_from_key(container: Container, q: str) -> str:
    from ai_rate_limiter.adapters.postgres import provider_from_row

    return provider_from_row(container.store.queue_providers(T, q)[0][0]).limiter_key


def test_the_process_keeps_one_set_of_threads_within_lambdas_quota(container: Container) -> None:
    pool = container.threads()
    assert container.threads() is pool  # kept from one invocation to the next
    assert pool._max_workers == container.settings.worker_concurrency <= 1000  # 1,024 threads in all
    container.close()
    assert container.threads() is not pool  # a closed container starts new ones if used again


def lease_left_s(c: Container, message_id: str) -> float:
    with c.db.tx() as cur:
        cur.execute(
            "SELECT extract(epoch FROM lease_until - now()) AS s FROM messages WHERE id = %s", (message_id,)
        )
        left: float = cur.fetchone()["s"]
        return left


def test_a_message_is_leased_briefly_and_its_lease_extended_while_it_is_worked_on(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So that an invocation that dies leaves its messages to the next claim within a lease,
    not when the whole of its time would have run out."""
    monkeypatch.setattr(invocation, "LEASE_S", 1.0)
    monkeypatch.setattr(invocation, "LEASE_RENEW_S", 0.2)
    fake.configure(latency_ms=2500, jitter_ms=0)
    q = make_queue(container, fake.url)
    [mid] = submit(container, q, "slow")
    event = take_event(container, q, 1)
    done: list[dict[str, int]] = []
    worker = threading.Thread(target=lambda: done.append(invocation.handle_event(container, event, 30)))
    worker.start()
    time.sleep(1.8)  # past the first lease: only its extensions keep the message this worker's
    assert 0 < lease_left_s(container, mid) <= 1.0
    assert container.store.claim([mid], lease_s=1.0) == []  # nobody else takes it
    worker.join(10)
    assert done == [{"completed": 1}]
    assert fake.stats()["total"]["requests"] == 1


def test_the_lease_of_a_claim_nobody_works_on_runs_out_within_lease_s(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    [mid] = submit(container, q, "orphan")
    [first] = container.store.claim([mid], lease_s=processing.LEASE_S)  # its invocation dies here
    assert 0 < lease_left_s(container, mid) <= processing.LEASE_S
    with container.db.tx() as cur:  # LEASE_S later
        cur.execute("UPDATE messages SET lease_until = now() - interval '1 ms' WHERE id = %s", (mid,))
    [again] = container.store.claim([mid], lease_s=processing.LEASE_S)
    assert again.attempt == first.attempt + 1
