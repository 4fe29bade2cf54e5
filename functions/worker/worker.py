"""Amazon MQ (RabbitMQ) event handler: one invocation per batch of deliveries."""

from __future__ import annotations

import gc
from typing import Any

from ai_rate_limiter.bootstrap import container
from ai_rate_limiter.services.invocation import handle_event

# What the imports made lives as long as the process: keep it out of the garbage collector's
# full passes, which otherwise stop every thread for 100 ms and more while requests wait to
# leave at their slots.
gc.freeze()


def handler(event: dict[str, Any], context: Any) -> dict[str, int]:
    return handle_event(container(), event, context.get_remaining_time_in_millis() / 1000)
