"""The shared limiter: one atomic Lua script in Redis, the same state for every worker."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files

import redis

from ..domain.limits import Limit, Reservation
from ..errors import DependencyUnavailable

SCRIPT = files("ai_rate_limiter").joinpath("resources/reserve.lua").read_text()


class RedisLimiter:
    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
        )
        self._reserve = self.client.register_script(SCRIPT)

    def reserve(self, candidates: Sequence[Sequence[Limit]], max_wait_s: float) -> Reservation:
        """Commit the soonest slot among `candidates` if it starts within `max_wait_s`."""
        keys: list[str] = []
        args: list[int] = [int(max_wait_s * 1_000_000), len(candidates)]
        for limits in candidates:
            args.append(len(limits))
            for limit in limits:
                keys.append(limit.key)
                args += [limit.increment_us, limit.tolerance_us]
        try:
            index, wait_us, reserved, slot_us = self._reserve(keys=keys, args=args)
        except redis.RedisError as exc:
            raise DependencyUnavailable(f"redis: {exc}") from exc
        return Reservation(int(index) - 1, max(int(wait_us), 0) / 1_000_000, bool(reserved), int(slot_us))

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise DependencyUnavailable(f"redis: {exc}") from exc
