"""Continuous flow and dynamic workers on the real services: an invocation goes on taking its
queue's messages; the bridge runs one mapping per shard in use; in the cloud the queue service
keeps the worker's event source mappings in step (botocore's Stubber stands in for Lambda)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from ai_rate_limiter.adapters.mappings import EventSourceMappings
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.services import invocation, messages, monitoring, queues
from botocore.stub import Stubber

from local import bridge as bridge_module
from local.bridge import Bridge
from tests.conftest import FakeProvider

from .conftest import make_queue, take_event

T = "default"


def finished(c: Container, batch_id: str) -> dict[str, tuple[str, Any]]:
    """custom_id -> (status, finished_at) of a batch's messages."""
    with c.db.tx() as cur:
        cur.execute("SELECT custom_id, status, finished_at FROM messages WHERE batch_id = %s", (batch_id,))
        return {r["custom_id"]: (r["status"], r["finished_at"]) for r in cur.fetchall()}


def wait_until(check: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"not within {timeout}s"
        time.sleep(0.1)


def test_a_slow_answer_does_not_hold_back_the_rest_of_the_queue(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    slow = {"prompt": "slow", "custom_id": "slow", "extra": {"metadata": {"fake_latency_ms": "3000"}}}
    fast = [{"prompt": f"fast {i}", "custom_id": f"fast-{i}"} for i in range(40)]
    batch = messages.submit(container, T, {"queue_id": q, "messages": [slow, *fast]})
    event = take_event(container, q, 1)  # the event holds the slow one alone
    assert invocation.handle_event(container, event, 30) == {"completed": 41}
    rows = finished(container, batch["batch_id"])
    assert {status for status, _ in rows.values()} == {"completed"}
    slow_done = rows.pop("slow")[1]
    # The invocation took the other 40 itself while the slow answer was out.
    assert all(done < slow_done for _, done in rows.values())
    assert fake.stats()["keys"] and fake.stats()["total"]["ok"] == 41


def test_an_invocation_acks_what_it_took_and_leaves_nothing_behind(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    messages.submit(container, T, {"queue_id": q, "messages": [{"prompt": f"p{i}"} for i in range(25)]})
    assert invocation.handle_event(container, take_event(container, q, 1), 30) == {"completed": 25}
    names = container.names(T, q)
    assert container.broker.ready(names.main) == 0
    # Nothing unacked either: a new reader finds the queue empty once the invocation's channel closed.
    reader = container.reader([names.main])
    try:
        assert reader.get(wait_s=0.5) is None
    finally:
        reader.close()


def test_a_slow_limit_leaves_its_backlog_in_the_broker(container: Container, fake: FakeProvider) -> None:
    """1 request per 2 s: the invocation takes a message only when its slot is near, so the rest
    stay in the broker (not claimed, not parked) until the invocation's time is up."""
    q = make_queue(container, fake.url, {"limit": 1, "time_window": 2})
    messages.submit(container, T, {"queue_id": q, "messages": [{"prompt": f"p{i}"} for i in range(20)]})
    result = invocation.handle_event(container, take_event(container, q, 1), 9)
    # 9 s: about three slots fit before the invocation stops taking work (its last third is kept
    # for the calls still out); nothing was deferred or published again.
    assert 2 <= result["completed"] <= 5 and set(result) == {"completed"}
    names = container.names(T, q)
    assert container.broker.ready(names.main) == 20 - result["completed"]
    assert sum(container.broker.ready(name) for _, name in names.delays()) == 0
    counts = queues.get(container, T, q)["counts"]
    assert counts["queued"] == 20 - result["completed"] and counts["processing"] == 0


def test_workers_spread_messages_over_their_shards(container: Container, fake: FakeProvider) -> None:
    q = make_queue(container, fake.url)
    queues.update(container, T, q, {"workers": 3})
    messages.submit(container, T, {"queue_id": q, "messages": [{"prompt": f"p{i}"} for i in range(30)]})
    names = container.names(T, q)
    assert [container.broker.ready(s) for s in names.shards(3)] == [10, 10, 10]
    # One invocation on shard 1 reads its own shard, then the others.
    assert invocation.handle_event(container, take_event_from(container, names.shard(1)), 30) == {
        "completed": 30
    }
    assert [container.broker.ready(s) for s in names.shards(3)] == [0, 0, 0]


def take_event_from(c: Container, shard: str) -> dict[str, Any]:
    from ai_rate_limiter.domain.rmq_event import basic_properties, build_event

    reader = c.reader([shard])
    try:
        tag, body = reader.get(wait_s=5.0) or (0, b"")
        reader.ack(tag)
    finally:
        reader.close()
    return build_event(shard, "/", [(body, False, basic_properties("application/json", None, 2, len(body)))])


def test_workers_are_validated_and_shown(container: Container, fake: FakeProvider) -> None:
    from ai_rate_limiter.errors import NotFound, ValidationFailed

    q = make_queue(container, fake.url)
    for bad in (0, container.settings.max_workers + 1, "2", None):
        with pytest.raises(ValidationFailed):
            queues.update(container, T, q, {"workers": bad})
    with pytest.raises(NotFound):
        queues.update(container, T, "no-such-queue", {"workers": 2})
    view = queues.update(container, T, q, {"workers": 2})
    assert view["workers"] == 2
    assert [w["broker_queue"] for w in view["worker_state"]] == container.names(T, q).shards(2)
    seen = monitoring.workers_view(container, T)
    assert [w["workers"] for w in seen["queues"]] == [2]
    assert seen["providers"][0]["limit_per_s"] == 1000


@pytest.fixture()
def bridge(container: Container, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bridge]:
    """The bridge in this process on the test's services; its execution environments are
    processes that read the same settings from the environment."""
    s = container.settings
    env = {
        "DATABASE_URL": s.database_url,
        "REDIS_URL": s.redis_url,
        "RABBITMQ_URL": s.rabbitmq_url,
        "BROKER_PREFIX": s.broker_prefix,
        "WORKER_TIMEOUT_S": str(s.worker_timeout_s),
        "PROVIDER_TIMEOUT_S": str(s.provider_timeout_s),
        "WORKER_IDLE_S": str(s.worker_idle_s),
        "LOG_LEVEL": "WARNING",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(bridge_module, "container", lambda: container)
    b = Bridge(s, sweeper=False)
    try:
        yield b
    finally:
        for consumer in b.consumers.values():
            consumer.stop()
        b.environments.close()
        for consumer in b.consumers.values():
            consumer.join(timeout=5)


def test_the_bridge_follows_each_queues_workers(
    bridge: Bridge, container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    names = container.names(T, q)
    bridge.sync()
    assert set(bridge.consumers) == {names.main}
    queues.update(container, T, q, {"workers": 3})
    bridge.sync()
    assert set(bridge.consumers) == set(names.shards(3))
    queues.update(container, T, q, {"workers": 1})
    # A retired mapping's consumer stays until it has stopped (never two invocations at once).
    wait_until(lambda: bridge.sync() is None and set(bridge.consumers) == {names.main}, 10)
    # Messages published while there were three shards are all done by the one worker left.
    queues.update(container, T, q, {"workers": 3})
    batch = messages.submit(
        container, T, {"queue_id": q, "messages": [{"prompt": f"p{i}"} for i in range(30)]}
    )
    queues.update(container, T, q, {"workers": 1})
    bridge.sync()
    wait_until(lambda: container.store.batch_counts(batch["batch_id"]).get("completed") == 30, 60)
    assert fake.stats()["total"]["ok"] == 30


FUNCTION = "airl-WorkerFunction-abc123"
BROKER = "arn:aws:mq:us-east-1:123456789012:broker:airl:b-1234a5b6-78cd-901e-2fgh-3i45j6k178l9"
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:airl-broker-AbCdEf"


def test_the_queue_service_keeps_the_event_source_mappings_in_step(
    container: Container, fake: FakeProvider
) -> None:
    client = boto3.client("lambda", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    container.__dict__["mappings"] = EventSourceMappings(client, FUNCTION, BROKER, SECRET, "/", 1, 0)
    listed = {"FunctionName": FUNCTION, "EventSourceArn": BROKER}

    def esm(n: int, queue: str) -> dict[str, Any]:
        return {
            "UUID": f"00000000-0000-4000-8000-{n:012d}",
            "EventSourceArn": BROKER,
            "Queues": [queue],
            "State": "Enabled",
            "BatchSize": 1,
            "MaximumBatchingWindowInSeconds": 0,
        }

    def create(queue: str) -> dict[str, Any]:
        return {
            "FunctionName": FUNCTION,
            "EventSourceArn": BROKER,
            "Queues": [queue],
            "BatchSize": 1,
            "MaximumBatchingWindowInSeconds": 0,
            "Enabled": True,
            "SourceAccessConfigurations": [
                {"Type": "BASIC_AUTH", "URI": SECRET},
                {"Type": "VIRTUAL_HOST", "URI": "/"},
            ],
        }

    queue_id = "mapped-queue"
    names = container.names(T, queue_id)
    main, w1, w2 = names.shards(3)
    with Stubber(client) as stub:
        # created with two workers: two mappings
        stub.add_response("list_event_source_mappings", {"EventSourceMappings": []}, listed)
        stub.add_response("create_event_source_mapping", esm(1, main), create(main))
        stub.add_response("create_event_source_mapping", esm(2, w1), create(w1))
        # three workers: one more
        stub.add_response(
            "list_event_source_mappings", {"EventSourceMappings": [esm(1, main), esm(2, w1)]}, listed
        )
        stub.add_response("create_event_source_mapping", esm(3, w2), create(w2))
        # one worker: the other two go
        stub.add_response(
            "list_event_source_mappings",
            {"EventSourceMappings": [esm(1, main), esm(2, w1), esm(3, w2)]},
            listed,
        )
        for n, shard in ((2, w1), (3, w2)):
            stub.add_response("delete_event_source_mapping", esm(n, shard), {"UUID": esm(n, shard)["UUID"]})
        # deleted: the last one goes
        stub.add_response("list_event_source_mappings", {"EventSourceMappings": [esm(1, main)]}, listed)
        stub.add_response("delete_event_source_mapping", esm(1, main), {"UUID": esm(1, main)["UUID"]})
        spec = {
            "provider_name": "fake",
            "provider_type": "openai",
            "api_key": "sk-mapped-0000",
            "limit": 10,
            "config": {"endpoint": fake.url},
        }
        queues.create(container, T, {"queue_id": queue_id, "workers": 2, "providers": [spec]})
        queues.update(container, T, queue_id, {"workers": 3})
        queues.update(container, T, queue_id, {"workers": 1})
        queues.delete(container, T, queue_id)
        stub.assert_no_pending_responses()


def test_what_is_left_in_retired_shards_goes_to_the_main_queue(
    container: Container, fake: FakeProvider
) -> None:
    from ai_rate_limiter.services.shards import fold_retired

    q = make_queue(container, fake.url)
    queues.update(container, T, q, {"workers": 3})
    messages.submit(container, T, {"queue_id": q, "messages": [{"prompt": f"p{i}"} for i in range(30)]})
    queues.update(container, T, q, {"workers": 1})
    names = container.names(T, q)
    assert fold_retired(container) == 20
    assert [container.broker.ready(s) for s in names.shards(3)] == [30, 0, 0]
    assert fold_retired(container) == 0
