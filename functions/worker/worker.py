"""Amazon MQ (RabbitMQ) event handler: one invocation per batch of deliveries."""

from __future__ import annotations

from typing import Any

from ai_rate_limiter.bootstrap import container
from ai_rate_limiter.services.invocation import handle_event


def handler(event: dict[str, Any], context: Any) -> dict[str, int]:
    return handle_event(container(), event, context.get_remaining_time_in_millis() / 1000)
