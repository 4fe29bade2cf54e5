"""The seed README's own examples, over HTTP, through the running stack."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from typing import Any

from tests.conftest import Receiver, random_key

from .conftest import ROOT, Stack, wait_until


def seed_queue(stack: Stack, queue_id: str) -> dict[str, Any]:
    return {
        "queue_id": queue_id,
        "providers": [
            {
                "provider_name": "OpenAI",
                "provider_type": "openai",
                "api_key": random_key(),
                "limit": 1000,
                "time_window": 60,
                "config": {"model": "gpt-4o", "endpoint": stack.fake},
            }
        ],
    }


def test_the_seed_quick_start(stack: Stack, receiver: Receiver) -> None:
    health = stack.call("GET", "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"

    r = stack.call("POST", "/queue/create", json=seed_queue(stack, "my-queue-123"))
    assert r.status_code == 201, r.text
    assert "my-queue-123" in [q["queue_id"] for q in stack.call("GET", "/queues").json()["queues"]]

    r = stack.call(
        "POST",
        "/message/create",
        json={"queue_id": "my-queue-123", "prompt": "Hello, this is a test message"},
    )
    assert r.status_code == 202 and r.json()["status"] == "queued"
    mid = r.json()["message_id"]
    done = wait_until(
        lambda: (m := stack.call("GET", f"/message/read/{mid}").json())["status"] == "completed" and m, 30
    )
    assert done["response"] == "Echo: Hello, this is a test message"
    assert done["provider"]["provider_name"] == "OpenAI" and done["usage"]["total_tokens"] > 0

    r = stack.call(
        "POST",
        "/message/create",
        json={
            "queue_id": "my-queue-123",
            "messages": [
                {"prompt": "First message in batch"},
                {"prompt": "Second message in batch"},
                {"prompt": "Third message in batch"},
            ],
            "webhook_url": receiver.url,
            "webhook_event": "on_complete",
        },
    )
    assert r.status_code == 202 and r.json()["total"] == 3
    bid = r.json()["batch_id"]
    wait_until(lambda: stack.call("GET", f"/batch/{bid}").json()["status"] == "completed", 30)

    results = stack.call("GET", f"/batch/{bid}/results").json()["results"]
    assert [x["response"] for x in results] == [
        "Echo: First message in batch",
        "Echo: Second message in batch",
        "Echo: Third message in batch",
    ]
    table = list(csv.DictReader(io.StringIO(stack.call("GET", f"/batch/{bid}/results?format=csv").text)))
    assert [row["prompt"] for row in table] == [
        "First message in batch",
        "Second message in batch",
        "Third message in batch",
    ]

    payload = wait_until(lambda: [b for _, b in receiver.received if b["status"] == "completed"], 30)[0]
    assert payload["batch_id"] == bid and payload["counts"]["completed"] == 3
    assert payload["results_url"] == f"{stack.api}/batch/{bid}/results"
    wait_until(lambda: stack.call("GET", "/batch/" + bid).json()["webhook"]["status"] == "delivered", 10)

    queue = stack.call("GET", "/queue/my-queue-123").json()
    assert queue["counts"]["completed"] == 4


def test_the_seed_provider_endpoints(stack: Stack) -> None:
    body = seed_queue(stack, "unused")["providers"][0]
    created = stack.call("POST", "/provider/create", json=body)
    assert created.status_code == 201 and body["api_key"] not in created.text
    pid = created.json()["provider_id"]
    assert pid in [p["provider_id"] for p in stack.call("GET", "/providers").json()["providers"]]
    patched = stack.call("PATCH", f"/provider/update/{pid}", json={"limit": 500})
    assert patched.json()["limit"] == 500
    assert stack.call("DELETE", f"/provider/delete/{pid}").status_code == 200
    gone = stack.call("GET", f"/provider/{pid}")
    assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"


def test_queues_created_after_start_are_consumed_and_deleted_ones_dropped(stack: Stack) -> None:
    r = stack.call("POST", "/queue/create", json=seed_queue(stack, "late-queue"))
    assert r.status_code == 201
    mid = stack.call("POST", "/message/create", json={"queue_id": "late-queue", "prompt": "late"}).json()[
        "message_id"
    ]
    wait_until(lambda: stack.call("GET", f"/message/read/{mid}").json()["status"] == "completed", 30)
    assert stack.call("DELETE", "/queue/late-queue").status_code == 200
    assert (
        stack.call("POST", "/message/create", json={"queue_id": "late-queue", "prompt": "x"}).status_code
        == 404
    )


def test_up_names_the_service_that_is_down_and_exits_non_zero() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, "-m", "local.up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "redis is unreachable" in done.stderr and "redis-server" in done.stderr
    assert "postgres" not in done.stderr


def test_unknown_routes_and_methods_answer_problems(stack: Stack) -> None:
    r = stack.call("GET", "/no/such/route")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["status"] == 404
    r = stack.call("DELETE", "/providers")
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"
    assert r.headers["allow"] == "GET"


def test_any_other_method_is_405_in_the_apis_shape(stack: Stack) -> None:
    """http.server would answer a method it has no handler for (TRACE) with a bare 501."""
    r = stack.call("TRACE", "/queues")
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"
    assert r.headers["allow"] == "GET"
    assert stack.call("TRACE", "/no/such/route").status_code == 404
