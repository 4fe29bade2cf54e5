"""The `flow` section: batches through the running stack with the default settings, against
providers that enforce their limits over short windows, with heavy-tailed answers, hundreds of
requests in flight, and 1, 2 and 4 workers. Only the scenario changes from run to run.

Every utilization is measured at the fake provider (its admitted requests' span against the
limit); the delay between each slot and the request's departure is what the worker measured at
the last step before its HTTP transport (`GET /workers`).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from local.bench.stack import Stack, environments_peak_rss_mb, utilization_row


def _provider_row(
    stats: dict[str, Any], n: int, limit: int, window: float, end_to_end: float
) -> dict[str, Any]:
    span = stats["last_at"] - stats["first_at"]
    return utilization_row(
        n,
        stats,
        (stats["ok"] - 1) * window / limit,
        end_to_end,
        limit=limit,
        window_s=window,
        provider_max_in_window=stats["max_in_window"],
        provider_limit=limit,
        provider_over_limit=stats["over_limit"],
        provider_max_in_flight=stats["max_in_flight"],
        messages_per_s=round((stats["ok"] - 1) / span, 2) if span > 0 else None,
    )


def steady_rate(stack: Stack, key: str, period_s: float) -> float | None:
    """Admitted requests a second over whole answer-time periods from the first: a worker that
    holds its most requests in flight sends them in a burst and then, once the first answers
    come back, one for each answer; whole periods count every echo of the burst once."""
    arrivals = stack.http.get(f"{stack.fake}/_fake/arrivals", params={"key": key}).json()["arrivals"]
    if len(arrivals) < 2:
        return None
    periods = int((arrivals[-1] - arrivals[0]) // period_s) if period_s > 0 else 0
    if periods < 1:
        return None
    end = arrivals[0] + periods * period_s
    return round(sum(1 for t in arrivals if t < end) / (periods * period_s), 2)


def scenario(
    stack: Stack,
    n: int,
    limit: int,
    window: float,
    latency: dict[str, Any],
    workers: int = 1,
    timeout: float = 600,
) -> dict[str, Any]:
    """One batch of `n` through a queue on one OpenAI-type provider that the fake holds to
    `limit` per `window` with answers as `latency` says."""
    key = f"sk-bench-{uuid.uuid4().hex}"
    stack.fake_config(keys={key: {"limit": limit, "window": window, **latency}})
    queue_id = f"flow-{uuid.uuid4().hex[:8]}"
    providers = [stack.provider("openai", key, limit, window)]
    created = stack.post(
        "/queue/create", {"queue_id": queue_id, "workers": workers, "providers": providers}
    ).json()
    provider_id = created["providers"][0]["provider_id"]
    end_to_end = stack.run_batch(queue_id, n, timeout=timeout)
    row = _provider_row(stack.fake_stats(key), n, limit, window, end_to_end)
    row["steady_messages_per_s"] = steady_rate(stack, key, latency.get("latency_ms", 0) / 1000)
    seen = next(p for p in stack.get("/workers")["providers"] if p["provider_id"] == provider_id)
    row["arrival_delay_ms"] = seen["slot_to_departure_ms"]
    row["wait_for_slot_ms"] = seen["wait_for_slot_ms"]
    row["held_back"] = seen["held_back_last_minute"]
    row["workers"] = workers
    row["worker_peak_rss_mb"] = round(environments_peak_rss_mb(stack.bridge_pid), 1)
    row["fake_latency"] = latency
    stack.http.delete(f"{stack.api}/queue/{queue_id}", headers=stack.auth)
    return row


def quick_start(stack: Stack, n: int = 3, latency_ms: int = 300, rounds: int = 5) -> dict[str, Any]:
    """A few prompts on an idle queue with room under its limit: seconds from submitting them to
    the batch's completion (the median of `rounds`, each on a new queue), against the answer
    time alone."""
    times = []
    for _ in range(rounds):
        key = f"sk-bench-{uuid.uuid4().hex}"
        stack.fake_config(keys={key: {"limit": 100, "window": 1.0, "latency_ms": latency_ms, "jitter_ms": 0}})
        queue_id = stack.queue(stack.provider("openai", key, 100, 1.0))
        time.sleep(1.5)  # idle: the bridge has found the queue and nothing runs
        times.append(stack.run_batch(queue_id, n, timeout=60, poll_s=0.02))
        stack.http.delete(f"{stack.api}/queue/{queue_id}", headers=stack.auth)
    median = sorted(times)[len(times) // 2]
    return {
        "n": n,
        "provider_latency_s": latency_ms / 1000,
        "done_s": round(median, 3),
        "done_s_runs": [round(t, 3) for t in times],
        "overhead_s": round(median - latency_ms / 1000, 3),
    }


def run(stack: Stack, scale: float = 1.0) -> dict[str, Any]:
    def size(x: int) -> int:
        return max(int(x * scale), 50)

    uniform_300 = {"latency_ms": 300, "latency_dist": "uniform"}
    results: dict[str, Any] = {
        # 40 requests a second over 1 s windows, 0.3 s answers: 30 s of work
        "short_window": scenario(stack, size(1200), 40, 1.0, uniform_300),
        # the same rate over 10 s windows
        "ten_second_window": scenario(stack, size(1200), 400, 10.0, uniform_300),
        # lognormal answers: median 1 s, sigma 1.0 (p99 about 10 s), 20 requests a second
        "heavy_tail": scenario(
            stack, size(600), 20, 1.0, {"latency_ms": 1000, "latency_dist": "lognormal", "sigma": 1.0}
        ),
        # 100 a second with 5 s answers: 500 requests in flight
        "in_flight": scenario(stack, size(3000), 100, 1.0, {"latency_ms": 5000, "latency_dist": "uniform"}),
    }
    # A provider allowing 250 a second with 10 s answers: one worker holds at most
    # WORKER_CONCURRENCY (600) requests in flight, 60 a second; it is the bound.
    workers: dict[str, Any] = {}
    for w in (1, 2, 4):
        n = size({1: 1800, 2: 3600, 4: 7200}[w])
        workers[str(w)] = scenario(
            stack, n, 250, 1.0, {"latency_ms": 10_000, "latency_dist": "uniform"}, workers=w
        )
    base = workers["1"]["steady_messages_per_s"]
    for row in workers.values():
        row["messages_per_s"] = row["steady_messages_per_s"]
        row["speedup"] = round(row["messages_per_s"] / base, 3) if base and row["messages_per_s"] else None
    results["workers"] = workers
    results["quick_start"] = quick_start(stack)
    return results
