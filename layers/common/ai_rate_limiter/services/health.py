"""Health: each dependency's state; unhealthy if any is down."""

from __future__ import annotations

from collections.abc import Callable

from ..bootstrap import Container
from ..errors import AppError


def check(c: Container, tenant: str | None) -> tuple[bool, dict[str, object]]:
    """Anyone may ask; only a caller with a key (`tenant`) is told why a dependency is down
    (the error names hosts) and which of its providers are out of quota."""
    probes: dict[str, Callable[[], object]] = {
        "postgres": c.db.ping,  # not through the store, which needs the key store too
        "redis": c.limiter.ping,
        "rabbitmq": c.broker.ping,
        # No data key (none configured, or KMS refusing): no provider key can be taken or used.
        "key_store": lambda: c.keys,
    }
    deps: dict[str, str] = {}
    for name, probe in probes.items():
        try:
            probe()
            deps[name] = "ok"
        except AppError as exc:
            deps[name] = "down" if tenant is None else f"down: {exc.detail}"
    down = [n for n, state in deps.items() if state != "ok"]
    body: dict[str, object] = {"status": "ok" if not down else "unavailable", "dependencies": deps}
    if down:
        body["detail"] = f"unreachable: {', '.join(down)}"
    store_up = not {"postgres", "key_store"} & set(down)
    if tenant is not None and store_up and (out := c.store.exhausted_providers(tenant)):
        body["providers_out_of_quota"] = out
        body["status"] = body["status"] if down else "degraded"
    return not down, body
