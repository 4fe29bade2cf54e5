"""Benchmark our Redis GCRA limiter against the `limits` library's Redis strategies.

For every strategy: the latency of one call, calls per second from 1 and from 8 processes, and an
accuracy run (8 processes, one key, 100 per 2 s) that reports the most admits in any 2 s window,
the utilization and the Redis commands sent per admit.

python -m local.bench.limiter [--quick]

Uses (and flushes) only the Redis database named in `redis_url` (DB 13 by default).
"""

from __future__ import annotations

import bisect
import json
import multiprocessing as mp
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.pool import Pool
from multiprocessing.synchronize import Barrier
from typing import Any

import redis
from ai_rate_limiter.adapters.redis_limiter import RedisLimiter
from ai_rate_limiter.domain.limits import Limit
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter, RateLimiter, SlidingWindowCounterRateLimiter

DEFAULT_URL = "redis://127.0.0.1:6379/13"
STRATEGIES = ("ours", "ours_requests_and_tokens", "limits_moving_window", "limits_sliding_window")
PROCS = 8
HIGH_LIMIT = 10**9  # per second: nothing ever waits
ACCURACY_LIMIT = 100
ACCURACY_WINDOW_S = 2
TOKEN_LIMIT = 100_000  # tokens per window; 500 per admit, so the request limit binds
TOKENS_PER_ADMIT = 500
MAX_WAIT_S = 60.0
START_MARGIN_S = 0.1  # time the pool's workers get to connect before a timed phase starts
MIN_RETRY_SLEEP_S = 0.001
MAX_ATTEMPTS = 1_000_000  # bound on every retry / call loop

Check = Callable[[], object]
Acquire = Callable[[float], int | None]  # run end (time.time()) -> admit time in us, None if after end


class CommandCounter:
    """Counts every Redis command sent through these methods (EVALSHA, SCRIPT LOAD, ...): each
    call of one of them is one command."""

    def __init__(self, *methods: tuple[object, str]) -> None:
        self.count = 0
        for owner, name in methods:
            self._count(owner, name)

    def _count(self, owner: object, name: str) -> None:
        inner = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return inner(*args, **kwargs)

        setattr(owner, name, counted)


def ours_counter(ours: RedisLimiter) -> CommandCounter:
    """Our limiter's commands: those it writes itself on its thread's connection, and those
    of its pooled client (loading a script)."""
    return CommandCounter((ours, "_send"), (ours.client, "execute_command"))


@dataclass(frozen=True)
class Task:
    strategy: str
    url: str
    key: str
    start_at: float  # time.time() at which the timed phase starts
    duration_s: float


# --- the strategies ------------------------------------------------------------------------------


def _ours_limits(strategy: str, key: str, limit: int, window_s: float) -> list[Limit]:
    """Strict pacing (tolerance 0) for the accuracy run; a 1 s tolerance when `limit` is the high one."""
    tolerance_us = 1_000_000 if limit >= HIGH_LIMIT else 0
    per_request_us = max(round(window_s * 1e6 / limit), 1)
    limits = [Limit(f"{key}:req", per_request_us, tolerance_us)]
    if strategy == "ours_requests_and_tokens":
        token_limit = TOKEN_LIMIT if limit < HIGH_LIMIT else HIGH_LIMIT
        per_admit_us = max(round(TOKENS_PER_ADMIT * window_s * 1e6 / token_limit), 1)
        limits.append(Limit(f"{key}:tok", per_admit_us, tolerance_us))
    return limits


def _limits_strategy(strategy: str, url: str) -> tuple[RateLimiter, CommandCounter]:
    storage = RedisStorage(url)
    counter = CommandCounter((storage.storage, "execute_command"))
    if strategy == "limits_moving_window":
        return MovingWindowRateLimiter(storage), counter
    return SlidingWindowCounterRateLimiter(storage), counter


def make_check(strategy: str, url: str, key: str) -> tuple[Check, CommandCounter]:
    """One limiter call on a key whose limit is so high that nothing waits."""
    if strategy.startswith("ours"):
        ours = RedisLimiter(url)
        candidates = [_ours_limits(strategy, key, HIGH_LIMIT, 1.0)]
        return (lambda: ours.reserve(candidates, MAX_WAIT_S)), ours_counter(ours)
    limiter, counter = _limits_strategy(strategy, url)
    item = RateLimitItemPerSecond(HIGH_LIMIT)
    return (lambda: limiter.hit(item, key)), counter


def _ours_acquire(strategy: str, url: str, key: str) -> tuple[Acquire, CommandCounter]:
    ours = RedisLimiter(url)
    candidates = [_ours_limits(strategy, key, ACCURACY_LIMIT, ACCURACY_WINDOW_S)]
    redis_s, redis_us = ours.client.time()  # before counting starts: Redis clock minus ours
    offset_s = redis_s + redis_us / 1e6 - time.time()

    def acquire(end_s: float) -> int | None:
        reservation = ours.reserve(candidates, MAX_WAIT_S)  # one EVALSHA per admit
        if not reservation.reserved:
            raise RuntimeError(f"no slot within {MAX_WAIT_S} s")
        if reservation.slot_us > (end_s + offset_s) * 1e6:
            return None
        time.sleep(reservation.wait_s)
        return reservation.slot_us  # the admit time is the slot on the Redis clock

    return acquire, ours_counter(ours)


def _limits_acquire(strategy: str, url: str, key: str) -> tuple[Acquire, CommandCounter]:
    limiter, counter = _limits_strategy(strategy, url)
    item: RateLimitItem = RateLimitItemPerSecond(ACCURACY_LIMIT, ACCURACY_WINDOW_S)
    limiter.get_window_stats(item, key)  # before counting starts: connect, load the script

    def acquire(end_s: float) -> int | None:
        # No reservation: try `hit`; when refused, ask `get_window_stats` for the reset time and
        # sleep until it (at least 1 ms, at most until the run ends), then try again.
        for _ in range(MAX_ATTEMPTS):
            if limiter.hit(item, key):
                now = time.time()  # the admit time is our clock right after the successful hit
                return round(now * 1e6) if now <= end_s else None
            reset_s = limiter.get_window_stats(item, key).reset_time
            now = time.time()
            if now >= end_s:
                return None
            time.sleep(min(max(reset_s - now, MIN_RETRY_SLEEP_S), end_s - now))
        raise RuntimeError("retry loop did not end")

    return acquire, counter


def make_acquire(strategy: str, url: str, key: str) -> tuple[Acquire, CommandCounter]:
    """Block until admitted under 100 per 2 s on `key`; say when (in us)."""
    if strategy.startswith("ours"):
        return _ours_acquire(strategy, url, key)
    return _limits_acquire(strategy, url, key)


# --- workers (top level, so that "spawn" can pickle them) ----------------------------------------

_barrier: Barrier | None = None


def _init_worker(barrier: Barrier) -> None:
    global _barrier
    _barrier = barrier


def _wait_for_start(start_at: float) -> None:
    """Every worker of the pool holds one task (none passes the barrier before all 8 have one)."""
    if _barrier is not None:
        _barrier.wait(timeout=60)
    time.sleep(max(start_at - time.time(), 0.0))


def _count_calls(check: Check, end_s: float) -> int:
    calls = 0
    for _ in range(10**9):
        check()
        calls += 1
        if time.time() >= end_s:
            break
    return calls


def _ready(_: int) -> None:
    """Return once all workers have started (spawned and imported this module)."""
    _wait_for_start(0.0)


def _throughput_worker(task: Task) -> int:
    check, _ = make_check(task.strategy, task.url, task.key)
    check()  # connect and load the script before the clock starts
    _wait_for_start(task.start_at)
    return _count_calls(check, task.start_at + task.duration_s)


def _accuracy_worker(task: Task) -> tuple[list[int], int]:
    """Admit times (us) within the run, and the Redis commands sent up to the last of them."""
    acquire, counter = make_acquire(task.strategy, task.url, task.key)
    _wait_for_start(task.start_at)
    counter.count = 0
    end_s = task.start_at + task.duration_s
    admits: list[int] = []
    calls_at_last_admit = 0
    for _ in range(MAX_ATTEMPTS):
        admit_us = acquire(end_s)
        if admit_us is None:
            break
        admits.append(admit_us)
        calls_at_last_admit = counter.count
    return admits, calls_at_last_admit


# --- measurements ---------------------------------------------------------------------------------


def _new_key() -> str:
    return f"bench:{uuid.uuid4().hex}"


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[round(q * (len(sorted_values) - 1))]


def measure_latency(strategy: str, url: str, n: int, warmup: int) -> tuple[float, float]:
    check, _ = make_check(strategy, url, _new_key())
    for _ in range(warmup):
        check()
    samples: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        check()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    return _percentile(samples, 0.5), _percentile(samples, 0.99)


def measure_throughput_1proc(strategy: str, url: str, duration_s: float) -> float:
    check, _ = make_check(strategy, url, _new_key())
    check()
    start = time.time()
    calls = _count_calls(check, start + duration_s)
    return calls / (time.time() - start)


def _tasks(strategy: str, url: str, duration_s: float) -> list[Task]:
    task = Task(strategy, url, _new_key(), time.time() + START_MARGIN_S, duration_s)
    return [task] * PROCS


def measure_throughput_8procs(pool: Pool, strategy: str, url: str, duration_s: float) -> float:
    counts = pool.map(_throughput_worker, _tasks(strategy, url, duration_s), chunksize=1)
    return sum(counts) / duration_s


def max_in_window(admits_us: list[int], window_us: int) -> int:
    """The most admits in any half-open interval (t - window, t] over the admit times t."""
    ordered = sorted(admits_us)
    return max(
        (i + 1 - bisect.bisect_right(ordered, t - window_us) for i, t in enumerate(ordered)), default=0
    )


def measure_accuracy(pool: Pool, strategy: str, url: str, duration_s: float) -> dict[str, float]:
    results = pool.map(_accuracy_worker, _tasks(strategy, url, duration_s), chunksize=1)
    admits = [t for times, _ in results for t in times]
    calls = sum(c for _, c in results)
    expected = ACCURACY_LIMIT * duration_s / ACCURACY_WINDOW_S
    return {
        "limit": float(ACCURACY_LIMIT),
        "admits": float(len(admits)),
        "max_in_window": float(max_in_window(admits, ACCURACY_WINDOW_S * 1_000_000)),
        "utilization": len(admits) / expected,
        "redis_calls_per_admit": calls / len(admits) if admits else float("nan"),
    }


def flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def interleaved_rates(pool: Pool, url: str, rounds: int, each_s: float) -> dict[str, dict[str, float]]:
    """Calls per second from 1 and from 8 processes, measured in short rounds that take the
    strategies in turn, so that the machine's noise falls on all of them alike; the median."""
    one: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    eight: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for _ in range(rounds):
        for strategy in STRATEGIES:
            flush(url)
            one[strategy].append(measure_throughput_1proc(strategy, url, each_s))
            eight[strategy].append(measure_throughput_8procs(pool, strategy, url, each_s))
    return {
        s: {
            "checks_per_s_1proc": statistics.median(one[s]),
            "checks_per_s_8procs": statistics.median(eight[s]),
        }
        for s in STRATEGIES
    }


def bench_strategy(pool: Pool, strategy: str, url: str, quick: bool) -> dict[str, float]:
    flush(url)
    p50, p99 = measure_latency(strategy, url, 2_000 if quick else 20_000, 200 if quick else 1_000)
    flush(url)
    accuracy = measure_accuracy(pool, strategy, url, 4.0 if quick else 10.0)
    return {"p50_us": p50, "p99_us": p99, **accuracy}


def run(redis_url: str = DEFAULT_URL, quick: bool = False) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(PROCS)
    with ctx.Pool(PROCS, initializer=_init_worker, initargs=(barrier,)) as pool:
        pool.map(_ready, range(PROCS), chunksize=1)  # no measurement while workers still import
        results = {strategy: bench_strategy(pool, strategy, redis_url, quick) for strategy in STRATEGIES}
        rates = interleaved_rates(pool, redis_url, 3 if quick else 9, 0.3 if quick else 0.5)
    flush(redis_url)
    return {
        s: {
            "p50_us": r["p50_us"],
            "p99_us": r["p99_us"],
            **rates[s],
            **{k: v for k, v in r.items() if k not in ("p50_us", "p99_us")},
        }
        for s, r in results.items()
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
