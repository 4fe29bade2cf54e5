"""Webhook delivery: POST a JSON summary through the egress client."""

from __future__ import annotations

import json
from typing import Any

import httpx


class WebhookSender:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def send(self, url: str, payload: dict[str, Any]) -> str | None:
        """POST the payload; None on a 2xx, else a short description of the failure."""
        try:
            response = self.http.post(
                url,
                content=json.dumps(payload, default=str),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
