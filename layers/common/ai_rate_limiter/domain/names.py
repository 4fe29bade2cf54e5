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
