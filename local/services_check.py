"""Are PostgreSQL, Redis and RabbitMQ reachable? Say which is not and how to start it.

python -m local.services_check
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pika
import psycopg2
import redis
from ai_rate_limiter.adapters.rabbitmq import connection_parameters
from ai_rate_limiter.config import Settings

HOW_TO_START = {
    "postgres": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "redis": 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log",
    "rabbitmq": "rabbitmq-server -detached",
}


def _postgres(s: Settings) -> None:
    parts = urlsplit(s.database_url)
    psycopg2.connect(urlunsplit(parts._replace(path="/postgres")), connect_timeout=3).close()


def _redis(s: Settings) -> None:
    redis.Redis.from_url(s.redis_url, socket_connect_timeout=3).ping()


def _rabbitmq(s: Settings) -> None:
    pika.BlockingConnection(connection_parameters(s.rabbitmq_url)).close()


CHECKS: dict[str, Callable[[Settings], None]] = {
    "postgres": _postgres,
    "redis": _redis,
    "rabbitmq": _rabbitmq,
}


def unreachable(s: Settings) -> dict[str, str]:
    down = {}
    for name, check in CHECKS.items():
        try:
            check(s)
        except Exception as exc:
            down[name] = f"{type(exc).__name__}: {exc}".strip()
    return down


def report(s: Settings) -> bool:
    down = unreachable(s)
    for name, why in down.items():
        print(f"{name} is unreachable ({why}).\n  Start it with: {HOW_TO_START[name]}", file=sys.stderr)
    return not down


if __name__ == "__main__":
    sys.exit(0 if report(Settings.from_env()) else 1)
