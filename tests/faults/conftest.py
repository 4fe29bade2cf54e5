"""The fault tests: the whole stack (`python -m local.up`, its defaults) against the real
services, with Redis and PostgreSQL reached through a TCP fault proxy each, so that a test
can cut them; each test records its figures, printed at the end of the run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings

from tests.conftest import Receiver
from tests.e2e.conftest import Stack, running_stack
from tests.tcp_proxy import TcpProxy

FIGURES: list[tuple[str, dict[str, Any]]] = []
RESULTS = Path(__file__).resolve().parents[2] / "faults-results.json"


def record(fault: str, **figures: Any) -> None:
    FIGURES.append((fault, figures))
    print(f"FAULT {fault}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault tests: figures")
    for fault, figures in FIGURES:
        terminalreporter.write_line(f"{fault}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    RESULTS.write_text(json.dumps([{"fault": f, **figs} for f, figs in FIGURES], indent=2) + "\n")


@dataclass
class Faulty:
    """The stack, its services' proxies, and a container on the same database (not proxied)
    to read rows with while a service is cut."""

    stack: Stack
    redis: TcpProxy
    postgres: TcpProxy
    c: Container


def through(url: str, proxy: TcpProxy) -> str:
    netloc = urlsplit(url).netloc
    host = netloc.rsplit("@", 1)[-1]
    return url.replace(host, f"127.0.0.1:{proxy.port}", 1)


@pytest.fixture(scope="module")
def faulty(services: None, receiver_server: Receiver) -> Iterator[Faulty]:
    redis, postgres = TcpProxy(6379), TcpProxy(5432)
    settings: list[Settings] = []

    def env_for(s: Settings) -> dict[str, str]:
        settings.append(s)
        return {"REDIS_URL": through(s.redis_url, redis), "DATABASE_URL": through(s.database_url, postgres)}

    try:
        with running_stack(receiver_server, "faults", 10, env_for) as stack:
            c = Container(settings[0])
            try:
                yield Faulty(stack, redis, postgres, c)
            finally:
                c.close()
    finally:
        redis.close()
        postgres.close()
