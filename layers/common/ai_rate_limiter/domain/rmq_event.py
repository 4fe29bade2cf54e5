"""The Amazon MQ (RabbitMQ) Lambda event: parsed by the worker, built by the local bridge."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

EVENT_SOURCE = "aws:rmq"
LOCAL_ARN = "arn:aws:mq:local:000000000000:broker:local:b-local"


@dataclass(frozen=True)
class Delivery:
    queue: str
    vhost: str
    data: bytes
    redelivered: bool = False
    headers: dict[str, Any] = field(default_factory=dict)


def _header_value(value: Any) -> Any:
    """String headers arrive as {"bytes": [...]}; other values as they are."""
    if isinstance(value, Mapping) and isinstance(value.get("bytes"), list):
        return bytes(value["bytes"]).decode("utf-8", "replace")
    return value


def parse_event(event: Mapping[str, Any]) -> list[Delivery]:
    out: list[Delivery] = []
    for key, messages in (event.get("rmqMessagesByQueue") or {}).items():
        queue, _, vhost = str(key).rpartition("::")
        for m in messages or []:
            props = m.get("basicProperties") or {}
            headers = {k: _header_value(v) for k, v in (props.get("headers") or {}).items()}
            try:
                data = base64.b64decode(m.get("data") or "", validate=True)
            except ValueError:
                data = b""
            out.append(Delivery(queue, vhost, data, bool(m.get("redelivered")), headers))
    return out


def _header_json(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return {"bytes": list(value.encode())}
    return value


def basic_properties(
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    delivery_mode: int | None,
    body_size: int,
    **props: Any,
) -> dict[str, Any]:
    stamp = props.get("timestamp")
    return {
        "contentType": content_type,
        "contentEncoding": props.get("content_encoding"),
        "headers": {k: _header_json(v) for k, v in (headers or {}).items()} or None,
        "deliveryMode": delivery_mode,
        "priority": props.get("priority"),
        "correlationId": props.get("correlation_id"),
        "replyTo": props.get("reply_to"),
        "expiration": props.get("expiration"),
        "messageId": props.get("message_id"),
        "timestamp": None
        if stamp is None
        else datetime.fromtimestamp(stamp, UTC).strftime("%b %-d, %Y, %-I:%M:%S %p"),
        "type": props.get("type"),
        "userId": props.get("user_id"),
        "appId": props.get("app_id"),
        "clusterId": props.get("cluster_id"),
        "bodySize": body_size,
    }


def build_event(
    queue: str,
    vhost: str,
    messages: Iterable[tuple[bytes, bool, dict[str, Any]]],
    arn: str = LOCAL_ARN,
) -> dict[str, Any]:
    """`messages`: (body, redelivered, basicProperties) as the event source mapping sends them."""
    return {
        "eventSource": EVENT_SOURCE,
        "eventSourceArn": arn,
        "rmqMessagesByQueue": {
            f"{queue}::{vhost}": [
                {
                    "basicProperties": props,
                    "redelivered": redelivered,
                    "data": base64.b64encode(body).decode(),
                }
                for body, redelivered, props in messages
            ]
        },
    }
