"""Webhooks as the Standard Webhooks spec has them: signed, sent within a total deadline.

Each delivery carries `webhook-id` (the same on every retry of one event), `webhook-timestamp`
(this attempt's Unix seconds) and `webhook-signature`: `v1,` + base64(HMAC-SHA256(key,
"{id}.{timestamp}.{body}")) over the exact body bytes sent, one such entry per secret,
space-separated (two while a secret is being rotated). A secret is `whsec_` + base64 of random
bytes; the HMAC key is the decoded part. Signing takes any secret: a batch's today, a tenant
endpoint's later.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ..domain.backoff import retry_after_s

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # the spec: at least 24


def batch_secret_id(batch_id: str) -> str:
    """What a batch's webhook secret is sealed for: that batch alone."""
    return f"batch-{batch_id}"  # no colon: the box keeps "<id>:<secret>"


def endpoint_secret_id(endpoint_id: str) -> str:
    """What a tenant endpoint's secret is sealed for: that endpoint alone."""
    return f"endpoint-{endpoint_id}"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret (the prefix is optional, as in the reference library)."""
    raw = secret.removeprefix(SECRET_PREFIX)
    return base64.b64decode(raw + "=" * (-len(raw) % 4))


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` entry of the `webhook-signature` header."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def webhook_headers(msg_id: str, timestamp: int, body: bytes, secrets_: Sequence[str]) -> dict[str, str]:
    """The three headers; without a secret (a batch stored before signing existed) no signature."""
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
    if secrets_:
        headers["webhook-signature"] = " ".join(signature(s, msg_id, timestamp, body) for s in secrets_)
    return headers


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """What a receiver checks: all three headers, a timestamp within `tolerance_s` of now (either
    way, against replays), and one `v1` signature in the header equal to ours (constant time)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id", "")
    stamp = lowered.get("webhook-timestamp", "")
    sent = lowered.get("webhook-signature", "")
    if not (msg_id and stamp.isascii() and stamp.isdigit() and sent):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > tolerance_s:
        return False
    try:
        expected = signature(secret, msg_id, int(stamp), body.encode() if isinstance(body, str) else body)
    except (binascii.Error, ValueError):
        return False
    found = False
    for entry in sent.split(" "):
        version, _, _ = entry.partition(",")
        if version == "v1":  # every entry is compared: the time taken tells nothing
            found |= hmac.compare_digest(entry.encode(), expected.encode())
    return found


@dataclass(frozen=True)
class Answer:
    """What the receiver answered: its status, or None and why there was none."""

    status: int | None
    error: str | None = None
    retry_after_s: float | None = None


class _Watchdog:
    """Cuts a delivery's connection at its deadline. httpx's timeouts bound each connect, read
    and write, not their sum: a receiver that dribbles a byte at a time would hold a delivery
    (and the sweeper's lease) open for as long as it likes. httpcore's trace hands us the
    connection's stream; shutting its socket down wakes the blocked read at once."""

    def __init__(self, deadline_s: float) -> None:
        self._lock = threading.Lock()
        self._stream: Any = None
        self.fired = False
        self._timer = threading.Timer(max(deadline_s, 0.0), self._cut)
        self._timer.daemon = True

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            with self._lock:
                self._stream = info.get("return_value")  # after TLS, the TLS stream owns the socket
                late = self.fired
            if late:
                self._cut()

    def _cut(self) -> None:
        with self._lock:
            self.fired = True
            stream = self._stream
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


class WebhookSender:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def send(self, url: str, msg_id: str, body: bytes, secrets_: Sequence[str], deadline_s: float) -> Answer:
        """POST `body`, signed with each secret, and wait at most `deadline_s` in all for the
        answer's status line and headers (its body is not read: the status is the answer).
        Each delivery has a connection of its own (`connection: close`), so the watchdog always
        has the socket to cut and a cut never spoils a pooled connection."""
        headers = {
            "content-type": "application/json",
            "connection": "close",
            **webhook_headers(msg_id, int(time.time()), body, secrets_),
        }
        with _Watchdog(deadline_s) as watchdog:
            try:
                with self.http.stream(
                    "POST", url, content=body, headers=headers, extensions={"trace": watchdog.trace}
                ) as response:
                    status = response.status_code
                    wait = retry_after_s(response.headers)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                if watchdog.fired:
                    return Answer(None, f"no answer within {deadline_s:.3g} s")
                return Answer(None, f"{type(exc).__name__}: {exc}"[:500])
        return Answer(status, None if 200 <= status < 300 else f"HTTP {status}", wait)
