"""The shared limiter against real Redis, from one process and from several."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
import uuid

import pytest
import redis
from ai_rate_limiter.adapters.redis_limiter import CALL_CONNECTIONS, RedisLimiter
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.domain.limits import Limit
from ai_rate_limiter.errors import LimiterUnavailable


def limit(interval_ms: float) -> Limit:
    return Limit(f"test:{uuid.uuid4().hex}", int(interval_ms * 1000))


def test_slots_are_paced_one_interval_apart(container: Container) -> None:
    lim, one = container.limiter, limit(100)
    waits = [lim.reserve([[one]], max_wait_s=10).wait_s for _ in range(5)]
    for i, w in enumerate(waits):
        assert abs(w - 0.1 * i) < 0.02, waits


def test_a_slot_beyond_max_wait_is_not_taken(container: Container) -> None:
    lim, one = container.limiter, limit(500)
    assert lim.reserve([[one]], 0).reserved
    refused = lim.reserve([[one]], 0.1)
    assert not refused.reserved and 0.3 < refused.wait_s <= 0.5
    taken = lim.reserve([[one]], 1)
    assert taken.reserved and abs(taken.wait_s - refused.wait_s) < 0.05


def test_the_candidate_with_the_soonest_slot_wins(container: Container) -> None:
    lim, slow, fast = container.limiter, limit(1000), limit(10)
    picks = [lim.reserve([[slow], [fast]], 10).index for _ in range(20)]
    assert picks[0] == 1  # both free: the one with more capacity
    assert picks.count(1) >= 18


def test_all_limits_of_a_candidate_are_committed_together(container: Container) -> None:
    lim, a, b = container.limiter, limit(100), limit(300)
    first = lim.reserve([[a, b]], 10)
    second = lim.reserve([[a, b]], 10)
    assert first.wait_s < 0.01 and abs(second.wait_s - 0.3) < 0.02


def _reserve_many(url: str, key: str, interval_us: int, n: int, out: multiprocessing.Queue[int]) -> None:
    lim = RedisLimiter(url)
    for _ in range(n):
        out.put(lim.reserve([[Limit(key, interval_us)]], 60).slot_us)


def test_processes_share_one_limit(container: Container) -> None:
    """Four processes, one key: on the Redis clock, no two granted slots are closer than the
    interval, and the schedule has no holes while they keep asking."""
    key, interval_us = f"test:{uuid.uuid4().hex}", 10_000
    out: multiprocessing.Queue[int] = multiprocessing.Queue()
    procs = [
        multiprocessing.Process(
            target=_reserve_many, args=(container.settings.redis_url, key, interval_us, 25, out)
        )
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    slots = sorted(out.get(timeout=30) for _ in range(100))
    for p in procs:
        p.join()
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert min(gaps) >= interval_us
    assert gaps.count(interval_us) >= 90  # only process start-up may leave a hole


def test_idle_keys_expire(container: Container) -> None:
    one = limit(200)
    container.limiter.reserve([[one]], 1)
    ttl_ms = container.limiter.client.pttl(one.key)
    assert 0 < ttl_ms <= 1300


def test_free_providers_share_work_by_capacity_and_weight(container: Container) -> None:
    lim = container.limiter
    fast, slow = limit(10), limit(30)  # 100/s and ~33/s
    picks = [lim.reserve([[fast], [slow]], 10).index for _ in range(40)]
    assert 27 <= picks.count(0) <= 33  # about 3:1, as their rates
    a, b = limit(10), limit(10)
    weighted = [lim.reserve([[a], [b]], 10, weights=[3.0, 1.0]).index for _ in range(40)]
    assert weighted.count(0) > weighted.count(1)


def test_the_limiter_keeps_a_few_connections_and_recovers_when_one_drops(container: Container) -> None:
    lim, one = container.limiter, limit(1)

    def client_id() -> int:
        return int(lim._send(("CLIENT", "ID")))

    lim.reserve([[one]], 1)
    top = client_id()
    assert client_id() == top  # kept between calls, not opened for each
    seen: set[int] = set()
    start = threading.Barrier(64)

    def call() -> None:
        start.wait()
        for _ in range(20):
            seen.add(client_id())

    threads = [threading.Thread(target=call) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(seen) <= CALL_CONNECTIONS  # 64 threads at once share a few connections
    top = client_id()
    lim.client.client_kill_filter(_id=top)  # the server drops it
    assert lim.reserve([[one]], 1).reserved  # the next call reconnects
    assert client_id() != top


def test_the_script_is_loaded_again_if_redis_forgot_it(container: Container) -> None:
    lim, one = container.limiter, limit(1)
    lim.reserve([[one]], 1)
    lim.client.script_flush()
    assert lim.reserve([[one]], 1).reserved
    assert lim.client.script_exists(lim._reserve.sha) == [True]


def test_a_call_whose_answer_was_lost_is_not_sent_again(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    lim, one = container.limiter, limit(100)
    assert lim.reserve([[one]], 10).wait_s < 0.05
    with lim._connection() as conn:  # the one the next call takes: the top of the stack
        pass
    real_read = conn.read_response

    def read_then_lose(*args: object, **kwargs: object) -> object:
        monkeypatch.undo()  # once: reconnecting reads answers too
        real_read(*args, **kwargs)  # the script ran ...
        conn.disconnect()
        raise redis.ConnectionError("connection lost")  # ... but its answer never came

    monkeypatch.setattr(conn, "read_response", read_then_lose)
    with pytest.raises(LimiterUnavailable):
        lim.reserve([[one]], 10)
    # The lost call took the slot at 0.1 s, once: the next one starts at 0.2 s, not 0.3 s.
    assert abs(lim.reserve([[one]], 10).wait_s - 0.2) < 0.05


def test_a_settlement_whose_answer_was_lost_is_applied_once(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settlement rides on a reservation whose answer times out after the script ran: sent
    again with the next call, under the same id, it moves the schedule once, not twice."""
    lim, tokens = container.limiter, limit(1)
    lim.reserve([[tokens]], 1)
    before = int(lim.client.get(tokens.key))
    with lim._connection() as conn:
        pass
    real_read = conn.read_response

    def read_then_time_out(*args: object, **kwargs: object) -> object:
        monkeypatch.undo()
        real_read(*args, **kwargs)  # the script ran and settled ...
        conn.disconnect()
        raise redis.TimeoutError("Timeout reading from socket")  # ... its answer never came

    monkeypatch.setattr(conn, "read_response", read_then_time_out)
    lim.settle({tokens.key: 500_000})  # used more than estimated: half a second more
    assert int(lim.client.get(tokens.key)) == before + 500_000
    lim.settle({})  # nothing new ...
    lim.reserve([], 0)  # ... and the unsure one goes again
    assert int(lim.client.get(tokens.key)) == before + 500_000
    assert lim._unsure == [] and lim._pending == {}


def test_a_short_lease_does_not_cut_a_longer_one_short(container: Container) -> None:
    lim, key = container.limiter, f"test:{uuid.uuid4().hex}"
    assert lim.acquire(key, 2, 30.0) is not None  # in flight for up to 30 s
    assert lim.acquire(key, 2, 0.1) is not None  # a short one after it
    time.sleep(1.3)  # the short lease, and a second more, are over
    assert lim.acquire(key, 1, 30.0) is None  # the long one still holds the only place


def test_many_more_threads_than_connections_reserve_at_once(container: Container) -> None:
    lim, one = container.limiter, limit(0.001)
    threads = 150  # far more than CALL_CONNECTIONS
    all_in = threading.Barrier(threads)
    taken: list[bool] = []

    def reserve_and_stay() -> None:
        taken.append(lim.reserve([[one]], 10).reserved)
        all_in.wait(timeout=30)  # every thread is alive at once

    workers = [threading.Thread(target=reserve_and_stay) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert taken == [True] * threads
