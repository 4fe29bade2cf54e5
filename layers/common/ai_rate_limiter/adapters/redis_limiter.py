"""The shared limiter: one atomic Lua script in Redis, the same state for every worker."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.retry import Retry

from ..domain.limits import ClockOffset, Limit, Reservation
from ..errors import LimiterUnavailable

# An execution environment has 1,024 file descriptors for everything (Lambda's quota), and a
# worker holds hundreds of provider connections: the limiter keeps to a few of its own.
CALL_CONNECTIONS = 16  # for the scripts: each call holds one for about 0.1 ms
POOL_CONNECTIONS = 64  # for blocking waits (a place under max_concurrency) and script loads


def script(name: str) -> str:
    return files("ai_rate_limiter").joinpath(f"resources/{name}").read_text()


@dataclass(frozen=True)
class Settlement:
    key: str
    delta_us: int
    id: str


class RedisLimiter:
    def __init__(self, url: str) -> None:
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_CONNECTIONS,
            timeout=5,  # the longest a caller waits for a free connection
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
            # The pooled client's commands (blocking waits, script loads, health-check pings)
            # are tried once more, at once, on a connection the server dropped; none of them
            # moves a schedule. Timeouts are not retried: the call may have run.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self.client = redis.Redis(connection_pool=pool)
        self._reserve = self.client.register_script(script("reserve.lua"))
        self._push = self.client.register_script(script("push.lua"))
        self._refund = self.client.register_script(script("refund.lua"))
        self._concurrency = self.client.register_script(script("concurrency.lua"))
        self._pending: dict[str, int] = {}  # adjustments not sent yet, by key
        self._unsure: list[Settlement] = []  # sent, and maybe applied: sent again as they are
        self._lock = threading.Lock()
        self._clock = ClockOffset()
        self._idle: list[AbstractConnection] = []
        self._free = threading.BoundedSemaphore(CALL_CONNECTIONS)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[AbstractConnection]:
        """One of CALL_CONNECTIONS kept for the scripts: taking a connection from redis-py's pool
        and giving it back costs about as much as the script itself, so these are held apart,
        in a plain stack. One that failed is closed before it is given back, and opens again on
        its next use."""
        if not self._free.acquire(timeout=5):
            raise redis.ConnectionError("no limiter connection free for 5 s")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = cast(AbstractConnection, self.client.connection_pool.make_connection())
            try:
                yield conn
            except BaseException:
                conn.disconnect()
                raise
            finally:
                with self._lock:
                    self._idle.append(conn)
        finally:
            self._free.release()

    def reserve(
        self, candidates: Sequence[Sequence[Limit]], max_wait_s: float, weights: Sequence[float] = ()
    ) -> Reservation:
        """Commit the slot of the candidate that serves soonest by capacity (and `weights`, 1 by
        default) if it starts within `max_wait_s`.

        Adjustments that could not be sent earlier (`settle`) travel with this call, each under
        its settlement id, which the script applies once: one whose answer was lost (a read
        timeout: it may have run) is sent again with the same id."""
        adjustments: list[Settlement] = []
        if self._pending or self._unsure:
            with self._lock:
                fresh, self._pending = self._pending, {}
                adjustments, self._unsure = self._unsure, []
            adjustments += [Settlement(key, delta, uuid.uuid4().hex) for key, delta in fresh.items()]
        keys: list[str] = [a.key for a in adjustments] + [f"{a.key}:settled:{a.id}" for a in adjustments]
        args: list[int] = [int(max_wait_s * 1_000_000), len(adjustments), *(a.delta_us for a in adjustments)]
        args.append(len(candidates))
        for i, limits in enumerate(candidates):
            args += [round(1000 * (weights[i] if i < len(weights) else 1.0)), len(limits)]
            for limit in limits:
                keys.append(limit.key)
                args += [limit.increment_us, limit.tolerance_us]
        sent = time.monotonic()
        try:
            index, wait_us, reserved, slot_us = self._eval(self._reserve, keys, args)
        except redis.RedisError as exc:
            if adjustments:
                with self._lock:
                    self._unsure += adjustments
            raise LimiterUnavailable(f"redis: {exc}") from exc
        answered = time.monotonic()
        slot_us, wait_us = int(slot_us), int(wait_us)
        with self._lock:
            self._clock.observe((slot_us - wait_us) / 1e6, sent, answered)
            earliest, latest = self._clock.local_bounds(slot_us / 1e6)
        return Reservation(int(index) - 1, max(wait_us, 0) / 1e6, bool(reserved), slot_us, earliest, latest)

    def _eval(self, script: Any, keys: Sequence[str], args: Sequence[int | str]) -> Any:
        """EVALSHA written and read on this thread's connection: redis-py's command path (retry
        wrapper, metrics hooks, Script objects) costs more than the script itself. The script is
        loaded once if this Redis does not know it yet."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return self._send(command)
        except redis.exceptions.NoScriptError:
            self.client.script_load(script.script)
            return self._send(command)

    def _send(self, command: Sequence[Any]) -> Any:
        """Nothing that may have run is sent again: a reservation or settlement whose answer
        was lost may have been applied, and one applied twice could give back time that was
        used. So a connection the server closed while idle is noticed before sending (as
        redis-py's pool checks the connections it hands out) and opened again, and only a
        failed write, which Redis never saw whole, is made once more on a new connection."""
        with self._connection() as conn:
            try:
                if conn.can_read():  # data nobody asked for: start afresh
                    conn.disconnect()
            except (redis.ConnectionError, OSError):  # closed by the server, or never opened
                conn.disconnect()
            try:
                conn.send_command(*command)
            except redis.ConnectionError:  # the failed write has closed the connection
                conn.send_command(*command)
            return conn.read_response()

    def settle(self, adjustments: dict[str, int]) -> None:
        """Move these keys' schedules by `delta_us` (negative gives time back) at once: time
        given back after the schedule has run past it is lost. If Redis cannot be reached,
        the adjustment goes with the next reservation instead."""
        if not adjustments:  # most answers: no token limit, or the estimate was right
            return
        self._defer(adjustments)
        with contextlib.suppress(LimiterUnavailable):
            self.reserve([], 0)

    def _defer(self, adjustments: dict[str, int]) -> None:
        with self._lock:
            for key, delta_us in adjustments.items():
                if delta_us:
                    self._pending[key] = self._pending.get(key, 0) + int(delta_us)

    def push(self, limits: Sequence[Limit], not_before_s: float) -> int:
        """No slot on these limits starts sooner than `not_before_s` from now (a provider's reset)."""
        try:
            return int(self._eval(self._push, [lim.key for lim in limits], [int(not_before_s * 1_000_000)]))
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"redis: {exc}") from exc

    def refund(self, limits: Sequence[Limit], slot_us: int) -> int:
        """Give back the slot starting at `slot_us` on these limits if no later one was taken."""
        try:
            args = [slot_us, *(lim.increment_us for lim in limits)]
            return int(self._eval(self._refund, [lim.key for lim in limits], args))
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"redis: {exc}") from exc

    def acquire(self, key: str, max_in_flight: int, lease_s: float) -> str | None:
        """A place among `max_in_flight` requests, as a lease id; None when all are taken."""
        lease = uuid.uuid4().hex
        try:
            taken = self._eval(
                self._concurrency, [key], ["acquire", max_in_flight, int(lease_s * 1000), lease]
            )
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"redis: {exc}") from exc
        return lease if taken else None

    def release(self, key: str, lease: str) -> None:
        try:
            self._eval(self._concurrency, [key, f"{key}:wake"], ["release", lease])
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"redis: {exc}") from exc

    def wait_for_release(self, keys: Sequence[str], timeout_s: float) -> None:
        """Block until one of these providers frees a place (or the timeout passes)."""
        try:
            self.client.blpop([f"{k}:wake" for k in keys], timeout=max(timeout_s, 0.01))
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"redis: {exc}") from exc

    def ping(self) -> None:
        try:
            self._send(("PING",))
        except redis.RedisError as exc:
            raise LimiterUnavailable(f"redis: {exc}") from exc
