"""The shared limiter: one atomic Lua script in Redis, the same state for every worker."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.connection import AbstractConnection
from redis.retry import Retry

from ..domain.limits import ClockOffset, Limit, Reservation
from ..errors import LimiterUnavailable

MAX_CONNECTIONS = 10_000  # Redis's own default limit of clients


def script(name: str) -> str:
    return files("ai_rate_limiter").joinpath(f"resources/{name}").read_text()


class RedisLimiter:
    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=5,
            socket_connect_timeout=5,
            health_check_interval=30,
            # Every thread that calls the limiter holds a connection while it lives (each queue's
            # worker threads live between events): redis-py's default cap of 100 is too few.
            max_connections=MAX_CONNECTIONS,
            # The pooled client's commands (blocking waits, script loads, health-check pings)
            # are tried once more, at once, on a connection the server dropped; none of them
            # moves a schedule. Timeouts are not retried: the call may have run.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self._reserve = self.client.register_script(script("reserve.lua"))
        self._push = self.client.register_script(script("push.lua"))
        self._refund = self.client.register_script(script("refund.lua"))
        self._concurrency = self.client.register_script(script("concurrency.lua"))
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()
        self._clock = ClockOffset()
        self._local = threading.local()

    def _connection(self) -> AbstractConnection:
        """This thread's own connection of the shared pool: taking a connection from redis-py's
        pool and giving it back costs about as much as the script itself, so each thread keeps
        one for the limiter's calls, held by a single-connection client that gives it back
        when the thread ends."""
        client: redis.Redis | None = getattr(self._local, "client", None)
        if client is None:
            client = redis.Redis(connection_pool=self.client.connection_pool, single_connection_client=True)
            self._local.client = client
        assert client.connection is not None, "held until the client is closed"
        return client.connection

    def reserve(
        self, candidates: Sequence[Sequence[Limit]], max_wait_s: float, weights: Sequence[float] = ()
    ) -> Reservation:
        """Commit the slot of the candidate that serves soonest by capacity (and `weights`, 1 by
        default) if it starts within `max_wait_s`.

        Adjustments that could not be sent earlier (`settle`) travel with this call."""
        adjustments: dict[str, int] = {}
        if self._pending:
            with self._lock:
                adjustments, self._pending = self._pending, {}
        keys: list[str] = list(adjustments)
        args: list[int] = [int(max_wait_s * 1_000_000), len(adjustments), *adjustments.values()]
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
            self._defer(adjustments)
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
        conn = self._connection()
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
