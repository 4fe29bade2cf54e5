"""Start the whole stack (`python -m local.up`) on free ports and drive it over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.config import Settings

from local.fresh import drop_broker_queues, fresh_state
from tests.conftest import Receiver, base_settings, egress_allow

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "RABBITMQ_URL": settings.rabbitmq_url,
        "BROKER_PREFIX": settings.broker_prefix,
        "API_PORT": str(settings.api_port),
        "FAKE_PROVIDER_PORT": str(settings.fake_provider_port),
        "EGRESS_ALLOW": settings.egress_allow,
        "PROVIDER_KEY_SECRETS": settings.provider_key_secrets,  # the stack opens the tests' keys
        "ADMIN_API_KEY": settings.admin_api_key,
        "LOG_LEVEL": "WARNING",
        **extra,
    }


@dataclass
class Stack:
    api: str
    fake: str
    proc: subprocess.Popen[bytes]
    log: Path
    key: str = ""  # sent as a bearer token on every call
    settings: Settings | None = None  # what it was started with (before `env_for`)

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", **kw.pop("headers", {})}
        return httpx.request(method, f"{self.api}{path}", timeout=30, headers=headers, **kw)

    def fake_stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.fake}/_fake/stats").json()

    def configure_fake(self, **config: Any) -> None:
        httpx.post(f"{self.fake}/_fake/config", json=config).raise_for_status()


def wait_until(check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"gave up after {timeout}s")
        time.sleep(every)


@contextlib.contextmanager
def running_stack(
    receiver: Receiver,
    name: str,
    redis_db: int,
    env_for: Callable[[Settings], dict[str, str]] = lambda s: {},
    **extra_env: str,
) -> Iterator[Stack]:
    """`python -m local.up` on free ports with its own database (`..._<name>`), Redis database
    and broker prefix, fresh; stopped with SIGTERM, which it must answer by exiting 0.
    `env_for(settings)`: more of its environment, made from its settings."""
    fake_port = free_port()
    settings = base_settings(
        database_url=base_settings().database_url.replace("_test", f"_{name}"),
        redis_url=f"redis://127.0.0.1:6379/{redis_db}",
        broker_prefix=f"{base_settings().broker_prefix}{name}",
        api_port=free_port(),
        fake_provider_port=fake_port,
        egress_allow=egress_allow(f"http://127.0.0.1:{fake_port}", receiver.url),
    )
    c = fresh_state(Container(settings))
    log = Path(tempfile.mkstemp(prefix=f"airl-{name}-", suffix=".log")[1])
    env = stack_env(settings, **env_for(settings), **extra_env)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "local.up"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{settings.api_port}"
    try:
        wait_until(lambda: proc.poll() is not None or b"is running" in log.read_bytes(), 90)
        assert proc.poll() is None, log.read_text()
        fake = f"http://127.0.0.1:{settings.fake_provider_port}"
        yield Stack(api, fake, proc, log, settings.admin_api_key, settings)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        drop_broker_queues(c)
        c.close()
        print(log.read_text()[-3000:])
        assert code == 0, f"local.up exited {code} on SIGTERM"


@pytest.fixture(scope="session")
def stack(services: None, receiver_server: Receiver) -> Iterator[Stack]:
    """The stack as `make up` runs it: the defaults (the API's inbound limits included)."""
    with running_stack(receiver_server, "e2e", 14) as running:
        yield running
