"""Benchmarks through the running stack: API -> RabbitMQ -> worker processes -> fake provider.

Starts its own fake provider, API and worker bridges on free ports, against a benchmark
database (`ai_rate_limiter_bench`), Redis database 12 and broker prefix `airlbench`, and stops
them afterwards. Every figure comes from this run: the fake provider's own stats (arrivals,
429s, the most requests it saw in any window) and wall clocks around HTTP calls.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from ai_rate_limiter.adapters.secrets_box import new_secret
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings
from ai_rate_limiter.services.tenants import new_key

from local.fresh import drop_broker_queues, fresh_state
from local.up import spawn, stop, wait_ready

LATENCY_MS = 200
THROUGHPUT_WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    api: str
    fake: str
    api_pid: int
    settings: Settings
    bridge_pid: int = 0
    # One client for the whole run: a new one per call builds a TLS context each time, CPU
    # the benchmark would take from the stack it measures.
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    @property
    def auth(self) -> dict[str, str]:
        """For the API's routes only (the fake provider is not sent the admin key)."""
        return {"Authorization": f"Bearer {self.settings.admin_api_key}"}

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def post(self, path: str, body: Any, timeout: float = 60) -> httpx.Response:
        r = self.http.post(f"{self.api}{path}", json=body, timeout=timeout, headers=self.auth)
        r.raise_for_status()
        return r

    def get(self, path: str, **params: Any) -> Any:
        r = self.http.get(f"{self.api}{path}", params=params, headers=self.auth)
        r.raise_for_status()
        return r.json()

    def fake_config(self, **config: Any) -> None:
        self.http.post(f"{self.fake}/_fake/config", json=config, timeout=10).raise_for_status()

    def fake_stats(self, key: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.http.get(f"{self.fake}/_fake/stats", timeout=10).json()["keys"][key]
        return stats

    def queue(self, *providers: dict[str, Any], workers: int = 1) -> str:
        queue_id = f"bench-{uuid.uuid4().hex[:8]}"
        self.post("/queue/create", {"queue_id": queue_id, "workers": workers, "providers": list(providers)})
        return queue_id

    def provider(self, kind: str, key: str, limit: int, window: float, **extra: Any) -> dict[str, Any]:
        return {
            "provider_name": f"bench-{kind}",
            "provider_type": kind,
            "api_key": key,
            "limit": limit,
            "time_window": window,
            "config": {"endpoint": self.fake, "max_tokens": 64},
            **extra,
        }

    def run_batch(self, queue_id: str, n: int, timeout: float, poll_s: float = 0.25) -> float:
        """Submit n prompts as one batch; seconds from submitting until the batch completed."""
        started = time.monotonic()
        prompts = [{"prompt": f"Benchmark prompt {i}: describe the number {i}"} for i in range(n)]
        batch = self.post("/message/create", {"queue_id": queue_id, "messages": prompts}).json()
        wait_for(lambda: self.get(f"/batch/{batch['batch_id']}")["status"] == "completed", timeout, poll_s)
        elapsed = time.monotonic() - started
        done = self.get(f"/batch/{batch['batch_id']}")["counts"]
        if done["completed"] != n:
            raise RuntimeError(f"benchmark batch did not complete cleanly: {done}")
        return elapsed


def wait_for(check: Callable[[], bool], timeout: float, poll_s: float = 0.25) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"gave up after {timeout:.0f}s")
        time.sleep(poll_s)


@contextmanager
def running_stack(bridge: bool = True, **overrides: str) -> Iterator[Stack]:
    base = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/ai_rate_limiter_bench",
            "REDIS_URL": "redis://127.0.0.1:6379/12",
            "BROKER_PREFIX": "airlbench",
            "PROVIDER_KEY_SECRETS": new_secret(),  # the run's own: its database starts empty
            "ADMIN_API_KEY": new_key(),
        }
    )
    settings = replace(base, api_port=free_port(), fake_provider_port=free_port())
    container = fresh_state(Container(settings))
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "BROKER_PREFIX": settings.broker_prefix,
        "API_PORT": str(settings.api_port),
        "FAKE_PROVIDER_PORT": str(settings.fake_provider_port),
        "EGRESS_ALLOW": f"127.0.0.1:{settings.fake_provider_port}",  # the fake, past the egress guard
        "PROVIDER_KEY_SECRETS": settings.provider_key_secrets,
        "ADMIN_API_KEY": settings.admin_api_key,
        "LOG_LEVEL": "ERROR",
        **overrides,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            spawn(
                "local.fake_provider",
                "--port",
                str(settings.fake_provider_port),
                "--latency-ms",
                str(LATENCY_MS),
                "--jitter-ms",
                "20",
            )
        )
        api = spawn("local.api_server")
        procs.append(api)
        bridge_pid = 0
        if bridge:
            procs.append(spawn("local.bridge"))
            bridge_pid = procs[-1].pid
        url = f"http://127.0.0.1:{settings.api_port}"
        if not wait_ready(f"{url}/health", procs):
            raise RuntimeError("the benchmark stack did not come up")
        fake_url = f"http://127.0.0.1:{settings.fake_provider_port}"
        with Stack(url, fake_url, api.pid, settings, bridge_pid) as stack:
            yield stack
    finally:
        stop(procs)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        drop_broker_queues(container)
        container.close()


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def environments_peak_rss_mb(bridge_pid: int) -> float:
    """The largest peak RSS of the bridge's execution environments (worker processes)."""
    return max((peak_rss_mb(c) for c in children(bridge_pid)), default=0.0)


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def ingest(stack: Stack, batch_size: int = 10_000, runs: int = 5) -> dict[str, Any]:
    """Seconds until the API answers 202 to a batch: the median of `runs` batches."""
    queue_id = stack.queue(stack.provider("openai", f"sk-bench-{uuid.uuid4().hex}", 1, 3600))
    rss_before = peak_rss_mb(stack.api_pid)
    prompts = [
        {"prompt": f"Ingest prompt {i}: a sentence of ordinary length to stand for a real one"}
        for i in range(batch_size)
    ]
    body = json.dumps({"queue_id": queue_id, "messages": prompts}).encode()
    times = []
    for _ in range(runs):
        started = time.monotonic()
        r = stack.http.post(
            f"{stack.api}/message/create",
            content=body,
            headers={"content-type": "application/json", **stack.auth},
            timeout=120,
        )
        times.append(time.monotonic() - started)
        if r.status_code != 202 or r.json()["total"] != batch_size:
            raise RuntimeError(f"ingest answered {r.status_code}: {r.text[:200]}")
    peak = peak_rss_mb(stack.api_pid)
    stack.http.delete(f"{stack.api}/queue/{queue_id}", headers=stack.auth)
    return {
        "batch_size": batch_size,
        "accept_s": round(sorted(times)[len(times) // 2], 3),
        "accept_s_runs": [round(t, 3) for t in times],
        "api_peak_rss_mb": round(peak, 1),
        "api_rss_before_mb": round(rss_before, 1),
        "body_mb": round(len(body) / 1e6, 2),
    }


def arrival_rate(stats: dict[str, Any]) -> float:
    """Requests per second between the first and the last arrival the provider admitted."""
    span = stats["last_at"] - stats["first_at"]
    return (stats["ok"] - 1) / span if span > 0 else 0.0


def run_limited(stack: Stack, n: int, provider: dict[str, Any], fake_limits: dict[str, Any]) -> Any:
    """One batch through one provider that the fake holds to `fake_limits`; (stats, seconds)."""
    stack.fake_config(latency_ms=LATENCY_MS, keys={provider["api_key"]: fake_limits})
    end_to_end = stack.run_batch(stack.queue(provider), n, timeout=600)
    return stack.fake_stats(provider["api_key"]), end_to_end


def utilization_row(
    n: int, stats: dict[str, Any], ideal: float, end_to_end: float, **extra: Any
) -> dict[str, Any]:
    wall = stats["last_at"] - stats["first_at"]
    return {
        "n": n,
        "wall_s": round(wall, 2),
        "ideal_s": round(ideal, 2),
        "utilization": round(ideal / wall, 4),
        "end_to_end_s": round(end_to_end, 2),
        "provider_429s": stats["rate_limited"],
        **extra,
    }


def requests_utilization(stack: Stack, n: int, limit: int, window: float) -> dict[str, Any]:
    provider = stack.provider("openai", f"sk-bench-{uuid.uuid4().hex}", limit, window)
    st, end_to_end = run_limited(stack, n, provider, {"limit": limit, "window": window})
    return utilization_row(
        n,
        st,
        (n - 1) * window / limit,
        end_to_end,
        provider_max_in_window=st["max_in_window"],
        provider_limit=limit,
        window_s=window,
        provider_requests=st["requests"],
    )


def tokens_utilization(stack: Stack, n: int, token_limit: int, window: float) -> dict[str, Any]:
    provider = stack.provider(
        "openai", f"sk-bench-{uuid.uuid4().hex}", 100_000, window, token_limit=token_limit
    )
    st, end_to_end = run_limited(
        stack, n, provider, {"limit": 0, "window": window, "token_limit": token_limit}
    )
    ideal = st["tokens"] * (n - 1) / n * window / token_limit  # n - 1 gaps of the average cost
    return utilization_row(
        n,
        st,
        ideal,
        end_to_end,
        provider_max_in_window=st["max_tokens_in_window"],
        provider_limit=token_limit,
        window_s=window,
        provider_tokens=st["tokens"],
        unit="tokens",
    )


def two_providers(stack: Stack, n: int, limits: tuple[int, int], window: float) -> dict[str, Any]:
    keys = [f"sk-bench-{uuid.uuid4().hex}" for _ in limits]
    stack.fake_config(
        latency_ms=LATENCY_MS,
        keys={k: {"limit": lim, "window": window} for k, lim in zip(keys, limits, strict=True)},
    )
    q = stack.queue(
        stack.provider("openai", keys[0], limits[0], window),
        stack.provider("anthropic", keys[1], limits[1], window),
    )
    end_to_end = stack.run_batch(q, n, timeout=n * window / sum(limits) * 3 + 60)
    stats = [stack.fake_stats(k) for k in keys]
    rate = sum(arrival_rate(st) for st in stats)
    allowed = sum(limits) / window
    return {
        "n": n,
        "wall_s": round(n / rate, 2),
        "ideal_s": round(n / allowed, 2),
        "utilization": round(rate / allowed, 4),
        "end_to_end_s": round(end_to_end, 2),
        "provider_429s": sum(st["rate_limited"] for st in stats),
        "provider_max_in_window": [st["max_in_window"] for st in stats],
        "provider_limit": list(limits),
        "window_s": window,
        "provider_requests": [st["requests"] for st in stats],
    }


async def _plain_loop(url: str, n: int, concurrency: int) -> float:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Benchmark prompt"}],
        "max_tokens": 64,
    }
    headers = {"authorization": f"Bearer sk-ceiling-{uuid.uuid4().hex}"}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one() -> None:
            async with sem:
                (
                    await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                ).raise_for_status()

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        return n / (time.monotonic() - started)


def throughput(stack: Stack, n: int) -> dict[str, Any]:
    """Messages per second end to end with no limit and an instant provider, beside the best
    of a plain asyncio httpx loop at a few concurrencies against the same fake provider (run
    before and after ours; the better run counts)."""
    stack.fake_config(latency_ms=0, jitter_ms=0)
    key = f"sk-bench-{uuid.uuid4().hex}"
    # Two workers: one is one execution environment, a process, so it uses one core at most.
    q = stack.queue(stack.provider("openai", key, 1_000_000, 1), workers=THROUGHPUT_WORKERS)
    before = {c: asyncio.run(_plain_loop(stack.fake, n, c)) for c in (8, 32, 64)}
    elapsed = stack.run_batch(q, n, timeout=600)
    after = {c: asyncio.run(_plain_loop(stack.fake, n, c)) for c in (8, 32, 64)}
    loops = {c: max(before[c], after[c]) for c in before}  # the better of a run before and after ours
    best = max(loops, key=lambda c: loops[c])
    stack.fake_config(latency_ms=LATENCY_MS, jitter_ms=20)
    ours = n / elapsed
    return {
        "n": n,
        "messages_per_s": round(ours, 1),
        "ceiling_per_s": round(loops[best], 1),
        "ratio": round(ours / loops[best], 3),
        "ceiling_concurrency": best,
        "workers": THROUGHPUT_WORKERS,
        "plain_loop_per_s": {str(c): round(v, 1) for c, v in loops.items()},
    }


def run(quick: bool = False, only: str = "") -> dict[str, Any]:
    """Every section, or `only` the one named (`flow`, `utilization`, `throughput`, `ingest`)."""
    from local.bench import flow

    scale = 0.3 if quick else 1.0
    results: dict[str, Any] = {}
    if only == "flow":
        with running_stack() as stack:
            results["flow"] = flow.run(stack, scale)
        return results
    with running_stack(bridge=False) as stack:  # the API alone: in the cloud, workers run elsewhere
        results["ingest"] = ingest(stack)
    with running_stack() as stack:
        results["flow"] = flow.run(stack, scale)
        results["throughput"] = throughput(stack, int(3000 * scale))
        results["utilization"] = {
            # 30 requests (1,000 tokens) a second over 30 s windows, 1.5 windows' worth and more
            "requests": requests_utilization(stack, int(1350 * scale), limit=900, window=30.0),
            "tokens": tokens_utilization(stack, int(900 * scale), token_limit=30_000, window=30.0),
            "two_providers": two_providers(stack, int(1350 * scale), limits=(600, 300), window=30.0),
        }
    return results
