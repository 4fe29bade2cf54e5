"""Worker figures in Redis: each invocation's heartbeat, and per-minute counts and recent
measurements per worker and per provider. Best effort: a figure lost never stops work."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis

log = logging.getLogger(__name__)
BUCKET_S = 10  # counts are kept in buckets of this many seconds
KEEP_BUCKETS = 12
SAMPLES = 2000  # recent measurements kept per provider
HEARTBEAT_TTL_S = 15  # an invocation not heard of for this long has ended
PREFIX = "airl:mon"


def _bucket(at: float) -> int:
    return int(at // BUCKET_S)


class Monitor:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _quietly(self, what: str, pipe: Any) -> list[Any]:
        try:
            return list(pipe.execute())
        except redis.RedisError as exc:
            log.debug("worker figures not %s: %s", what, exc)
            return []

    def report(
        self,
        worker: str,
        heartbeat: Mapping[str, Any] | None,
        completed: int,
        providers: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """`worker`: tenant:queue:shard. `heartbeat` None: the invocation has ended.
        `providers`: provider id -> {sent, rate_limited, late, delays_s, waits_s}."""
        now = time.time()
        b = _bucket(now)
        ttl = BUCKET_S * KEEP_BUCKETS
        pipe = self.client.pipeline(transaction=False)
        key = f"{PREFIX}:w:{worker}"
        if heartbeat is None:
            pipe.delete(key)
        else:
            pipe.hset(key, mapping={k: str(v) for k, v in heartbeat.items()})
            pipe.expire(key, HEARTBEAT_TTL_S)
        if completed:
            pipe.incrby(f"{key}:done:{b}", completed)
            pipe.expire(f"{key}:done:{b}", ttl)
        for pid, f in providers.items():
            pk = f"{PREFIX}:p:{pid}"
            for name in ("sent", "rate_limited", "late"):
                if f[name]:
                    pipe.incrby(f"{pk}:{name}:{b}", f[name])
                    pipe.expire(f"{pk}:{name}:{b}", ttl)
            for name in ("delays_s", "waits_s"):
                if f[name]:
                    pipe.lpush(f"{pk}:{name}", *(f"{v:.6f}" for v in f[name]))
                    pipe.ltrim(f"{pk}:{name}", 0, SAMPLES - 1)
                    pipe.expire(f"{pk}:{name}", 3600)
        self._quietly("stored", pipe)

    def _last_minute(self, pipe: Any, key: str) -> None:
        b = _bucket(time.time())
        for i in range(60 // BUCKET_S + 1):  # the current bucket and the six before it
            pipe.get(f"{key}:{b - i}")

    @staticmethod
    def _sum(values: Iterable[Any]) -> int:
        return sum(int(v or 0) for v in values)

    def worker(self, worker: str) -> dict[str, Any]:
        key = f"{PREFIX}:w:{worker}"
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(key)
        self._last_minute(pipe, f"{key}:done")
        got = self._quietly("read", pipe)
        if not got:
            return {"invocation": None, "completed_last_minute": None}
        beat = {k.decode(): v.decode() for k, v in (got[0] or {}).items()}
        return {"invocation": beat or None, "completed_last_minute": self._sum(got[1:])}

    def provider(self, provider_id: str) -> dict[str, Any]:
        pk = f"{PREFIX}:p:{provider_id}"
        n = 60 // BUCKET_S + 1
        pipe = self.client.pipeline(transaction=False)
        for name in ("sent", "rate_limited", "late"):
            self._last_minute(pipe, f"{pk}:{name}")
        pipe.lrange(f"{pk}:delays_s", 0, -1)
        pipe.lrange(f"{pk}:waits_s", 0, -1)
        got = self._quietly("read", pipe)
        if not got:
            return {}
        return {
            "sent_last_minute": self._sum(got[0:n]),
            "rate_limited_last_minute": self._sum(got[n : 2 * n]),
            "late_last_minute": self._sum(got[2 * n : 3 * n]),
            "delays_s": [float(v) for v in got[3 * n]],
            "waits_s": [float(v) for v in got[3 * n + 1]],
        }
