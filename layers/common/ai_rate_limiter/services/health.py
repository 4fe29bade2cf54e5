"""Health: each dependency's state; unhealthy if any is down."""

from __future__ import annotations

from collections.abc import Callable

from ..bootstrap import Container
from ..errors import AppError


def check(c: Container) -> tuple[bool, dict[str, object]]:
    probes: dict[str, Callable[[], None]] = {
        "postgres": c.store.ping,
        "redis": c.limiter.ping,
        "rabbitmq": c.broker.ping,
    }
    deps: dict[str, str] = {}
    for name, probe in probes.items():
        try:
            probe()
            deps[name] = "ok"
        except AppError as exc:
            deps[name] = f"down: {exc.detail}"
    down = [n for n, state in deps.items() if state != "ok"]
    body: dict[str, object] = {"status": "ok" if not down else "unavailable", "dependencies": deps}
    if down:
        body["detail"] = f"unreachable: {', '.join(down)}"
    if "postgres" not in down and (out := c.store.exhausted_providers(c.settings.default_tenant)):
        body["providers_out_of_quota"] = out
        body["status"] = body["status"] if down else "degraded"
    return not down, body
