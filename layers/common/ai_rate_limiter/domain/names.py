"""Broker names for a queue: the one place they are derived."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BrokerNames:
    main: str
    dead_letter: str
    delay: str


def broker_names(prefix: str, tenant_id: str, queue_id: str) -> BrokerNames:
    main = f"{prefix}.{tenant_id}.{queue_id}"
    return BrokerNames(main=main, dead_letter=f"{main}.dlq", delay=f"{main}.delay")


def queue_from_broker_name(prefix: str, name: str) -> tuple[str, str] | None:
    """Inverse of `broker_names(...).main`; None for dead-letter, delay or foreign queues."""
    head, _, rest = name.partition(".")
    tenant, _, queue_id = rest.partition(".")
    if head != prefix or not tenant or not queue_id:
        return None
    if queue_id.endswith((".dlq", ".delay")):
        return None
    return tenant, queue_id
