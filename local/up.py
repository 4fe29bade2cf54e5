"""Run the whole service in the foreground: fake provider, API, event-source bridge + worker.

    python -m local.up

Checks the services first, creates the database if missing and applies migrations.
A component that exits is started again (`Component`). Ctrl-C or SIGTERM stops everything
it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from ai_rate_limiter.adapters.secrets_box import from_settings, new_secret
from ai_rate_limiter.config import Settings
from ai_rate_limiter.errors import AppError
from ai_rate_limiter.migrate import ensure_database, migrate
from ai_rate_limiter.services.tenants import new_key

from local.services_check import report

ROOT = Path(__file__).resolve().parents[1]
KEY_FILE = ROOT / ".local" / "provider-key-secrets"  # git-ignored
ADMIN_KEY_FILE = ROOT / ".local" / "admin-api-key"


def spawn(module: str, *args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env)


def kept(path: Path, make: Callable[[], str]) -> tuple[str, bool]:
    """The secret kept in `path` (git-ignored, readable by its owner only), made by `make` on
    this checkout's first run; and whether it was made now."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        made = False
    else:
        with os.fdopen(fd, "w") as out:
            out.write(make() + "\n")
        made = True
    return path.read_text().strip(), made


def provider_keys() -> str:
    """What provider API keys are sealed with: the environment's PROVIDER_KEY_SECRETS or KMS
    settings when set; otherwise a key this checkout's first run makes and keeps in KEY_FILE,
    put in the environment of every process started here."""
    if any(os.environ.get(k) for k in ("PROVIDER_KEY_SECRETS", "KMS_DATA_KEY", "KMS_KEY_ID")):
        return "the key(s) configured in the environment"
    os.environ["PROVIDER_KEY_SECRETS"], made = kept(KEY_FILE, new_secret)
    note = " (made now: keep it, the stored keys open only with it)" if made else ""
    return f"PROVIDER_KEY_SECRETS from {KEY_FILE.relative_to(ROOT)}{note}"


def admin_key() -> str:
    """Where the admin key comes from: ADMIN_API_KEY when set; otherwise a key this checkout's
    first run makes and keeps in ADMIN_KEY_FILE."""
    if os.environ.get("ADMIN_API_KEY"):
        return "ADMIN_API_KEY"
    os.environ["ADMIN_API_KEY"], made = kept(ADMIN_KEY_FILE, new_key)
    return f"{ADMIN_KEY_FILE.relative_to(ROOT)}{' (made now)' if made else ''}"


STABLE_S = 60.0  # a component up this long that exits is restarted at once, not after a backoff


@dataclass
class Component:
    """A process `make up` runs and restarts when it exits, as the cloud would start a fresh
    function: the first restart at once, then after 1, 2, 4 ... 30 s while it keeps exiting
    within STABLE_S of starting."""

    name: str
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_exits: int = 0
    due: float = 0.0  # when it is started again

    def start(self) -> None:
        self.proc, self.started = spawn(*self.args), time.monotonic()

    def check(self, now: float) -> None:
        """Restart it if it exited and its backoff is over."""
        if self.proc is not None and self.proc.poll() is not None:
            up_s = now - self.started
            self.quick_exits = 0 if up_s >= STABLE_S else self.quick_exits + 1
            delay = 0.0 if self.quick_exits <= 1 else min(2.0 ** (self.quick_exits - 2), 30.0)
            print(
                f"{self.name} exited ({self.proc.returncode}) after {up_s:.0f}s; restarting it"
                + (f" in {delay:.0f}s" if delay else ""),
                file=sys.stderr,
                flush=True,
            )
            self.proc, self.due = None, now + delay
        if self.proc is None and now >= self.due:
            self.start()


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def banner(s: Settings, fake: str, admin_from: str) -> str:
    api = f"http://{s.api_host}:{s.api_port}"
    return f"""
AI Rate Limiter is running
  API            {api}   (GET {api}/health)
  fake provider  {fake}   (GET {fake}/_fake/stats)
  worker         event-source bridge on {s.rabbitmq_url.rsplit("@", 1)[-1]}: one mapping per
                 queue worker, batch size {s.worker_batch_size}, window {s.worker_batching_window_s}s,
                 invocations of up to {s.worker_timeout_s:.0f}s
  admin API key  {s.admin_api_key}   (from {admin_from})
Try:
  export AIRL_KEY={s.admin_api_key}
  curl -s -X POST {api}/queue/create -H "Authorization: Bearer $AIRL_KEY" \\
    -H 'Content-Type: application/json' -d '{{"queue_id": "demo", "providers": [{{
    "provider_name": "Fake OpenAI", "provider_type": "openai", "api_key": "sk-demo",
    "limit": 60, "time_window": 60, "config": {{"model": "gpt-4o-mini", "endpoint": "{fake}"}}}}]}}'
  curl -s -X POST {api}/message/create -H "Authorization: Bearer $AIRL_KEY" \\
    -H 'Content-Type: application/json' -d '{{"queue_id": "demo", "prompt": "Hello"}}'
Ctrl-C stops everything.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description="run the whole service locally")
    parser.add_argument("--fake-latency-ms", default=os.environ.get("FAKE_LATENCY_MS", "200"))
    args = parser.parse_args()
    keys = provider_keys()
    admin_from = admin_key()
    s = Settings.from_env()
    try:
        from_settings(s)  # no key store, no service: a key is never stored unencrypted
    except AppError as exc:
        print(exc.detail, file=sys.stderr)
        return 1
    print(f"provider API keys sealed with {keys}", flush=True)
    if not report(s):
        return 1
    ensure_database(s.database_url)
    applied = migrate(s.database_url)
    print(f"database ready ({len(applied)} migration(s) applied)", flush=True)
    fake = f"http://{s.api_host}:{s.fake_provider_port}"
    # The egress guard lets requests reach only public https hosts and EGRESS_ALLOW's entries:
    # unless it is set, exactly the local fake provider, for every process started below.
    if not os.environ.get("EGRESS_ALLOW"):
        os.environ["EGRESS_ALLOW"] = f"{s.api_host}:{s.fake_provider_port}"
    print(f"egress allowed past the guard: {os.environ['EGRESS_ALLOW']} (EGRESS_ALLOW)", flush=True)
    fake_args = (
        "--host",
        s.api_host,
        "--port",
        str(s.fake_provider_port),
        "--latency-ms",
        args.fake_latency_ms,
    )
    components = [
        Component("fake provider", ("local.fake_provider", *fake_args)),
        Component("api", ("local.api_server",)),
        Component("bridge", ("local.bridge",)),  # the worker's event source mappings and the sweeper
    ]
    for component in components:
        component.start()
    procs = [p for component in components if (p := component.proc) is not None]
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if not wait_ready(f"http://{s.api_host}:{s.api_port}/health", procs):
            print("the stack did not come up; stopping", file=sys.stderr)
            return 1
        print(banner(s, fake, admin_from), flush=True)
        while not stopping:
            for component in components:
                component.check(time.monotonic())
            time.sleep(0.2)
        return 0
    finally:
        stop([p for component in components if (p := component.proc) is not None])


if __name__ == "__main__":
    sys.exit(main())
