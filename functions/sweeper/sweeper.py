"""Scheduled sweep: finishes batches and delivers their webhooks."""

from __future__ import annotations

from typing import Any

from ai_rate_limiter.bootstrap import container
from ai_rate_limiter.services.sweeper import sweep


def handler(event: dict[str, Any], context: Any) -> dict[str, int]:
    return sweep(container())
