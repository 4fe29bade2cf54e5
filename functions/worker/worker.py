"""Amazon MQ (RabbitMQ) event handler: one invocation per batch of deliveries."""

from __future__ import annotations

import gc
from typing import Any

from ai_rate_limiter.bootstrap import container
from ai_rate_limiter.services.invocation import handle_event

# The garbage collector's full passes stop every thread at once, for as long as it takes to
# walk every object the process holds: with hundreds of requests in flight, 50 to 150 ms, while
# requests wait to leave at their slots. A message's way through the worker leaves no reference
# cycle behind (a unit test holds it to that), so there is nothing for them to free while an
# invocation runs. What the imports made lives as long as the process and is kept out of them;
# full passes are left to the end of each invocation, with nothing in flight, and in between
# come at most a thousand times less often than by default (a backstop, not the rule).
gc.freeze()
FULL_PASS_EVERY = 10_000  # second-generation passes before a full one (CPython's default: 10)
gc.set_threshold(*gc.get_threshold()[:2], FULL_PASS_EVERY)


def handler(event: dict[str, Any], context: Any) -> dict[str, int]:
    try:
        return handle_event(container(), event, context.get_remaining_time_in_millis() / 1000)
    finally:
        gc.collect()
