"""Faults against the running stack and the real services, each printing its figures (and
`make test` gathers them in faults-results.json): worker processes killed, Redis and
PostgreSQL cut, the provider failing, a poison message, a process killed between commit and
publish, a worker paused past its lease, long and short deferrals side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.services import dispatch, invocation, messages, processing

from tests.conftest import FakeProvider, random_key
from tests.e2e.conftest import stack_env, wait_until
from tests.integration.conftest import make_queue, take_event

from .conftest import Faulty, record

pytestmark = pytest.mark.faults
T = "default"


# -- the stack, over its API -------------------------------------------------------------------


def queue(f: Faulty, *names: str, limit: int = 1000) -> tuple[str, dict[str, str]]:
    """A queue on the stack's fake provider, one provider per name: (queue id, key by name)."""
    keys = {name: random_key() for name in names or ("fake",)}
    specs = [
        {
            "provider_name": name,
            "provider_type": "openai",
            "api_key": key,
            "limit": limit,
            "time_window": 1,
            "config": {"endpoint": f.stack.fake},
        }
        for name, key in keys.items()
    ]
    queue_id = f"f-{os.urandom(4).hex()}"
    r = f.stack.call("post", "/queue/create", json={"queue_id": queue_id, "providers": specs})
    assert r.status_code == 201, r.text
    return queue_id, keys


def batch(f: Faulty, q: str, n: int, latency_ms: int, poison: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    def one(i: int) -> dict[str, Any]:
        metadata = {"fake_latency_ms": str(latency_ms)}
        if i in poison:
            metadata["fake_fail"] = "always"
        return {"prompt": f"p{i}", "extra": {"metadata": metadata}}

    r = f.stack.call("post", "/message/create", json={"queue_id": q, "messages": [one(i) for i in range(n)]})
    assert r.status_code == 202, r.text
    return str(r.json()["batch_id"])


def rows(f: Faulty, sql: str, *params: Any) -> list[dict[str, Any]]:
    with f.c.db.tx() as cur:
        cur.execute(sql, params)
        return [dict(r) for r in cur.fetchall()]


def counts(f: Faulty, bid: str) -> dict[str, int]:
    found = rows(f, "SELECT status, count(*) AS n FROM messages WHERE batch_id = %s GROUP BY status", bid)
    return {r["status"]: int(r["n"]) for r in found}


def finished(f: Faulty, bid: str, timeout: float) -> float:
    """Seconds until the batch is finished."""
    started = time.monotonic()
    wait_until(
        lambda: rows(f, "SELECT 1 FROM batches WHERE id = %s AND finished_at IS NOT NULL", bid), timeout
    )
    return time.monotonic() - started


def dead_lettered(f: Faulty, bid: str) -> int:
    return len(rows(f, "SELECT 1 FROM messages WHERE batch_id = %s AND dead_lettered_at IS NOT NULL", bid))


def fake_stats(f: Faulty, key: str) -> dict[str, Any]:
    return dict(f.stack.fake_stats()["keys"].get(key, {"requests": 0, "in_flight": 0, "server_errors": 0}))


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def worker_processes(f: Faulty) -> list[int]:
    """The bridge's execution environments: the worker processes."""
    [bridge] = [p for p in children(f.stack.proc.pid) if "local.bridge" in cmdline(p)]
    return [p for p in children(bridge) if "spawn_main" in cmdline(p)]


# -- the faults -----------------------------------------------------------------------------------


def test_every_worker_process_killed_with_hundreds_of_calls_in_flight(faulty: Faulty) -> None:
    f, n = faulty, 400
    q, keys = queue(f)
    bid = batch(f, q, n, latency_ms=4000)
    wait_until(lambda: fake_stats(f, keys["fake"])["in_flight"] >= 200, 60, every=0.05)
    killed = worker_processes(f)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    # What the killed workers had sent is still being answered (4 s each); a fresh worker
    # needs seconds to start: what is in flight now is what was in flight at the kill.
    in_flight = fake_stats(f, keys["fake"])["in_flight"]
    took = finished(f, bid, 240)
    calls = fake_stats(f, keys["fake"])["requests"]
    done = counts(f, bid)
    results = rows(
        f, "SELECT count(DISTINCT id) AS n FROM messages WHERE batch_id = %s AND status = 'completed'", bid
    )
    record(
        "kill -9 every worker process",
        killed=len(killed),
        in_flight_at_kill=in_flight,
        lost=n - done.get("completed", 0),
        duplicate_calls=calls - n,
        finished_after_s=round(took, 1),
    )
    assert killed
    assert done == {"completed": n} and results[0]["n"] == n
    assert 0 <= calls - n <= in_flight


def test_redis_cut_for_ten_seconds_mid_batch(faulty: Faulty) -> None:
    f, n = faulty, 300
    q, keys = queue(f, limit=40)
    bid = batch(f, q, n, latency_ms=100)
    wait_until(lambda: counts(f, bid).get("completed", 0) >= 40, 60)
    f.redis.cut()
    try:
        time.sleep(2.0)  # a slot taken before the cut may still be used
        before = fake_stats(f, keys["fake"])["requests"]
        time.sleep(8.0)
        during = fake_stats(f, keys["fake"])["requests"] - before
    finally:
        f.redis.restore()
    took = finished(f, bid, 120)
    done = counts(f, bid)
    record(
        "Redis down 10 s",
        provider_calls_while_down=during,
        failed=done.get("failed", 0),
        dead_lettered=dead_lettered(f, bid),
        finished_after_restore_s=round(took, 1),
        rate_limited=fake_stats(f, keys["fake"])["rate_limited"],
    )
    assert during == 0 and done == {"completed": n} and dead_lettered(f, bid) == 0


def failed_events(f: Faulty, since: int) -> int:
    """Worker events that raised (whole-batch retry) in the stack's log after byte `since`."""
    return f.stack.log.read_bytes()[since:].count(b"handler failed on")


def test_postgres_cut_mid_batch(faulty: Faulty) -> None:
    f, n = faulty, 300
    q, _ = queue(f, limit=40)
    bid = batch(f, q, n, latency_ms=100)
    wait_until(lambda: counts(f, bid).get("completed", 0) >= 40, 60)
    answers: list[tuple[int, str, float]] = []
    logged = f.stack.log.stat().st_size
    f.postgres.cut()
    try:
        end = time.monotonic() + 8.0
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                r = f.stack.call("post", "/message/create", json={"queue_id": q, "prompt": "while down"})
                answers.append((r.status_code, r.headers.get("content-type", ""), time.monotonic() - started))
            except httpx.HTTPError as exc:
                answers.append((0, type(exc).__name__, time.monotonic() - started))
            time.sleep(0.5)
    finally:
        f.postgres.restore()
    took = finished(f, bid, 60)
    stored = rows(f, "SELECT count(*) AS n FROM messages WHERE queue_id = %s AND batch_id IS NULL", q)[0]["n"]
    most_tries = rows(f, "SELECT max(tries) AS n FROM messages WHERE batch_id = %s", bid)[0]["n"]
    record(
        "PostgreSQL down 8 s",
        api_answers=len(answers),
        api_503=sum(a[0] == 503 for a in answers),
        api_202=sum(a[0] == 202 for a in answers),
        slowest_answer_s=round(max(a[2] for a in answers), 2),
        finished_after_restore_s=round(took, 1),
        dead_lettered=dead_lettered(f, bid),
        failed_events=failed_events(f, logged),
        most_tries=most_tries,
    )
    assert answers and all(a[0] == 503 and a[1] == "application/problem+json" for a in answers), answers
    assert max(a[2] for a in answers) < 2.0 and stored == 0
    # Invocations ride out a cut this short: none fails its event, whose messages would then
    # wait for the leases they still hold elsewhere, and none loses a message it holds (which
    # would wait for its lease to end, and count a try).
    assert failed_events(f, logged) == 0 and most_tries == 1
    assert took <= 30 and counts(f, bid) == {"completed": n} and dead_lettered(f, bid) == 0


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def test_rabbitmq_stopped_and_started_mid_batch(faulty: Faulty) -> None:
    f, n = faulty, 300
    q, keys = queue(f, limit=40)
    bid = batch(f, q, n, latency_ms=100)
    wait_until(lambda: counts(f, bid).get("completed", 0) >= 40, 60)
    rabbitmqctl("stop_app")
    try:
        time.sleep(5.0)
    finally:
        rabbitmqctl("start_app")  # the machine's broker is always left running
    rabbitmqctl("await_startup")
    took = finished(f, bid, 180)
    done = counts(f, bid)
    record(
        "RabbitMQ stop_app / start_app",
        lost=n - done.get("completed", 0),
        provider_calls=fake_stats(f, keys["fake"])["requests"],
        of=n,
        finished_after_restart_s=round(took, 1),
    )
    assert done == {"completed": n}


def test_the_provider_fails_every_call_for_two_seconds(faulty: Faulty) -> None:
    f, n = faulty, 200
    q, keys = queue(f, limit=100)
    bid = batch(f, q, n, latency_ms=50)
    wait_until(lambda: counts(f, bid).get("completed", 0) >= 20, 60)
    f.stack.configure_fake(error_rate=1.0)
    try:
        time.sleep(2.0)
    finally:
        f.stack.configure_fake(error_rate=0.0)
    took = finished(f, bid, 120)
    tries = rows(f, "SELECT max(tries) AS most FROM messages WHERE batch_id = %s", bid)[0]["most"]
    record(
        "provider 500s for 2 s",
        server_errors=fake_stats(f, keys["fake"])["server_errors"],
        most_attempts=tries,
        failed=counts(f, bid).get("failed", 0),
        finished_after_s=round(took, 1),
    )
    assert fake_stats(f, keys["fake"])["server_errors"] > 0 and counts(f, bid) == {"completed": n}


def test_the_provider_answers_nothing_for_three_seconds(faulty: Faulty) -> None:
    """Requests that arrive while the provider hangs get no answer before the call's deadline
    (PROVIDER_TIMEOUT_S, 60 s): they time out and are tried again."""
    f, n = faulty, 200
    q, _ = queue(f, limit=40)
    bid = batch(f, q, n, latency_ms=0)  # each answer's time is the fake's, set below
    f.stack.configure_fake(latency_ms=50, jitter_ms=0)
    wait_until(lambda: counts(f, bid).get("completed", 0) >= 20, 60)
    f.stack.configure_fake(latency_ms=120_000, jitter_ms=0, max_latency_ms=120_000)
    try:
        time.sleep(3.0)
    finally:
        f.stack.configure_fake(latency_ms=50, jitter_ms=0)
    took = finished(f, bid, 180)
    hung = rows(f, "SELECT count(*) AS n FROM messages WHERE batch_id = %s AND tries > 1", bid)[0]["n"]
    record(
        "provider hangs for 3 s",
        timed_out_and_retried=hung,
        failed=counts(f, bid).get("failed", 0),
        finished_after_s=round(took, 1),
    )
    assert hung > 0 and counts(f, bid) == {"completed": n}


def test_one_provider_of_two_out_of_quota(faulty: Faulty) -> None:
    f, n = faulty, 60
    q, keys = queue(f, "dry", "wet", limit=100)
    f.stack.configure_fake(keys={keys["dry"]: {"quota_exhausted": True}})
    bid = batch(f, q, n, latency_ms=50)
    finished(f, bid, 60)
    served = rows(f, "SELECT provider_name, count(*) AS n FROM messages WHERE batch_id = %s GROUP BY 1", bid)
    record(
        "one provider of two out of quota",
        completed=counts(f, bid).get("completed", 0),
        served_by={r["provider_name"]: r["n"] for r in served},
        dry_provider=rows(f, "SELECT status FROM providers WHERE name = 'dry' ORDER BY created_at DESC")[0][
            "status"
        ],
    )
    assert counts(f, bid) == {"completed": n} and {r["provider_name"] for r in served} == {"wet"}


def test_a_poison_message(faulty: Faulty) -> None:
    f, n = faulty, 20
    q, keys = queue(f, limit=100)
    bid = batch(f, q, n, latency_ms=20, poison={7})
    finished(f, bid, 120)
    dead = f.c.names(T, q).dead  # its copy goes there just after its row says so
    wait_until(lambda: f.c.broker.ready(dead) >= 1, 10)
    [poison] = rows(f, "SELECT * FROM messages WHERE batch_id = %s AND seq = 7", bid)
    calls = fake_stats(f, keys["fake"])["requests"]
    attempts = f.c.settings.max_attempts
    record(
        "a poison message",
        its_calls=calls - (n - 1),
        configured_attempts=attempts,
        status=poison["status"],
        dead_lettered=poison["dead_lettered_at"] is not None,
        in_dead_letter_queue=f.c.broker.ready(dead),
        others_completed=counts(f, bid).get("completed", 0),
    )
    assert (poison["status"], poison["tries"], poison["dead_lettered_at"] is not None) == (
        "failed",
        attempts,
        True,
    )
    assert f.c.broker.ready(dead) == 1  # its copy, and only its
    assert counts(f, bid) == {"completed": n - 1, "failed": 1} and calls == n - 1 + attempts


@pytest.mark.parametrize("step", ["publish", "batch_published"])
def test_the_api_process_killed_between_commit_and_publish_or_after_it(faulty: Faulty, step: str) -> None:
    """A process submits a batch and dies (os._exit) as it publishes, or once the broker has
    confirmed and before the batch is marked published: its batch is delivered, each prompt
    sent to the provider once."""
    f, n = faulty, 30
    q, keys = queue(f, limit=100)
    script = f"""
import os
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings
from ai_rate_limiter.services import messages
c = Container(Settings.from_env())
setattr(c.store if {step!r} == "batch_published" else c.broker, {step!r}, lambda *a, **k: os._exit(9))
batch = {{"queue_id": {q!r}, "messages": [{{"prompt": f"p{{i}}"}} for i in range({n})]}}
messages.submit(c, "default", batch)
"""
    env = stack_env(f.c.settings)
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=60, capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    [b] = rows(f, "SELECT id::text FROM batches WHERE queue_id = %s", q)
    with f.c.db.tx() as cur:  # the relay's 60 s, passed
        cur.execute(
            "UPDATE batches SET relay_after = now() WHERE id = %s AND relay_after IS NOT NULL", (b["id"],)
        )
    took = finished(f, b["id"], 60)
    calls = fake_stats(f, keys["fake"])["requests"]
    record(
        f"killed at {step}",
        delivered=counts(f, b["id"]).get("completed", 0),
        provider_calls=calls,
        of=n,
        finished_after_s=round(took, 1),
    )
    assert counts(f, b["id"]) == {"completed": n} and calls == n


# -- in one process and the services, without the stack ----------------------------------------


def test_a_worker_paused_past_its_lease_writes_nothing_late(container: Container, fake: FakeProvider) -> None:
    """A worker process is stopped (SIGSTOP) while its call is out; its lease runs out, another
    invocation takes the message over and stores its answer; the first, resumed, is fenced."""
    q = make_queue(container, fake.url)
    mid = messages.submit(
        container, T, {"queue_id": q, "prompt": "paused", "extra": {"metadata": {"fake_latency_ms": "1000"}}}
    )["message_id"]
    event = take_event(container, q, 1)
    script = """
import json, sys
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings
from ai_rate_limiter.services import invocation
event = json.loads(sys.stdin.read())
print(json.dumps(invocation.handle_event(Container(Settings.from_env()), event, 120)), flush=True)
"""
    env = stack_env(container.settings)
    worker = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert worker.stdin is not None and worker.stdout is not None
    worker.stdin.write(json.dumps(event))
    worker.stdin.close()
    wait_until(lambda: fake.stats()["total"]["requests"] >= 1, 30, every=0.02)
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        paused = time.monotonic()
        time.sleep(processing.LEASE_S + 1.0)
        [again] = container.store.claim([mid], processing.LEASE_S)  # taken over
        run = invocation.Invocation(container, processing.Deadline.after(60))
        run.start(again, None)
        run.drain()
        assert run.result() == {"completed": 1}
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    assert worker.wait(timeout=60) == 0
    late = json.loads(worker.stdout.read().strip().splitlines()[-1])
    m = messages.read(container, T, mid)
    record(
        "worker paused past its lease",
        paused_s=round(time.monotonic() - paused, 1),
        results=1 if m["status"] == "completed" else 0,
        its_outcome=late,
        provider_calls=fake.stats()["total"]["requests"],
    )
    assert late == {"lost": 1} and m["status"] == "completed" and fake.stats()["total"]["requests"] == 2


def test_an_hour_long_deferral_holds_back_none_of_the_short_ones(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    names = container.names(T, q)
    dispatch.publish_later(container, T, q, "00000000-0000-4000-8000-000000000000", 3600)
    started = time.monotonic()
    for i in range(50):
        dispatch.publish_later(container, T, q, f"00000000-0000-4000-8000-{i:012d}", 1.0)
    wait_until(lambda: container.broker.ready(names.main) >= 50, 30, every=0.05)
    took = time.monotonic() - started
    record(
        "an hour's deferral, then 50 of a second",
        back_after_s=round(took, 2),
        still_waiting=sum(container.broker.ready(n) for _, n in names.delays()),
    )
    assert took < 5 and container.broker.ready(names.main) == 50
