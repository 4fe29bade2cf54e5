"""Webhook signing and verification (Standard Webhooks), the retry schedule and its verdicts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

import pytest
from ai_rate_limiter.adapters.webhooks import Answer, new_secret, signature, verify, webhook_headers
from ai_rate_limiter.services.sweeper import MAX_RETRY_S, verdict, webhook_id, webhook_retry_s

# The Standard Webhooks reference libraries' own test vector (libraries/*/tests: test_sign_function).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def receiver_verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: int = 300) -> bool:
    """The README's receiver example, verbatim: only the standard library."""
    msg_id, ts, sigs = headers["webhook-id"], headers["webhook-timestamp"], headers["webhook-signature"]
    if abs(time.time() - int(ts)) > tolerance_s:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    expected = ("v1," + base64.b64encode(mac).decode()).encode()
    return any(hmac.compare_digest(expected, s.encode()) for s in sigs.split())


def signed(secret: str, body: bytes, timestamp: int | None = None, msg_id: str = "msg_1") -> dict[str, str]:
    return webhook_headers(msg_id, int(time.time()) if timestamp is None else timestamp, body, [secret])


def test_the_signature_matches_the_specs_test_vector() -> None:
    assert signature(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    headers = webhook_headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY, [SPEC_SECRET])
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP + 10)


def test_the_signature_is_hmac_sha256_over_id_timestamp_and_body_with_the_decoded_secret() -> None:
    secret = new_secret()
    body = '{"event":"batch.completed","note":"ünïcode"}'.encode()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, b"msg_abc.1700000000." + body, hashlib.sha256).digest()
    assert signature(secret, "msg_abc", 1700000000, body) == "v1," + base64.b64encode(mac).decode()


def test_a_new_secret_is_whsec_and_base64_of_32_random_bytes() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32


def test_verify_accepts_a_fresh_signed_delivery_with_headers_in_any_case() -> None:
    secret, body = new_secret(), b'{"a":1}'
    headers = signed(secret, body)
    assert verify(secret, headers, body)
    assert verify(secret, {k.title(): v for k, v in headers.items()}, body)
    assert verify(secret, headers, body.decode())
    assert verify(secret.removeprefix("whsec_"), headers, body)
    assert receiver_verify(secret, headers, body)


def test_verify_rejects_a_wrong_secret_an_altered_body_and_an_altered_id() -> None:
    secret, body = new_secret(), b'{"a":1}'
    headers = signed(secret, body)
    assert not verify(new_secret(), headers, body)
    assert not verify(secret, headers, b'{"a":2}')
    assert not verify(secret, headers, body + b" ")
    assert not verify(secret, {**headers, "webhook-id": "msg_2"}, body)
    assert not receiver_verify(new_secret(), headers, body)
    assert not receiver_verify(secret, headers, b'{"a":2}')


def test_verify_rejects_stale_future_and_malformed_timestamps() -> None:
    secret, body = new_secret(), b"{}"
    now = int(time.time())
    assert verify(secret, signed(secret, body, now - 299), body)
    assert not verify(secret, signed(secret, body, now - 301), body)
    assert not verify(secret, signed(secret, body, now + 301), body)
    assert verify(secret, signed(secret, body, now - 100), body, tolerance_s=200)
    assert not verify(secret, signed(secret, body, now - 100), body, tolerance_s=50)
    assert not receiver_verify(secret, signed(secret, body, now - 301), body)
    headers = signed(secret, body, now)
    for stamp in ("", "soon", "-1", "1.5", "١٢٣", " 1700000000"):
        assert not verify(secret, {**headers, "webhook-timestamp": stamp}, body)


def test_verify_rejects_missing_headers_and_signatures_of_other_schemes() -> None:
    secret, body = new_secret(), b"{}"
    headers = signed(secret, body)
    for name in headers:
        assert not verify(secret, {k: v for k, v in headers.items() if k != name}, body)
    valid = headers["webhook-signature"].removeprefix("v1,")
    for other in (f"v1a,{valid}", f"v2,{valid}", valid, f"v1,{valid[:-2]}", "v1,", "v1,ü"):
        assert not verify(secret, {**headers, "webhook-signature": other}, body)


def test_verify_accepts_one_valid_signature_among_several_separated_by_spaces() -> None:
    old, new, body = new_secret(), new_secret(), b'{"a":1}'
    now = int(time.time())
    rotating = webhook_headers("msg_1", now, body, [new, old])
    assert len(rotating["webhook-signature"].split(" ")) == 2
    assert verify(old, rotating, body) and verify(new, rotating, body)
    assert receiver_verify(old, rotating, body) and receiver_verify(new, rotating, body)
    valid = signed(old, body, now)["webhook-signature"]
    noise = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
    mixed = {**rotating, "webhook-signature": f"{noise} v1a,abc {valid} {noise}"}
    assert verify(old, mixed, body)
    assert not verify(new_secret(), mixed, body)
    assert not verify(old, {**mixed, "webhook-signature": f"{noise} v1a,abc"}, body)


def test_without_a_secret_a_delivery_has_an_id_and_timestamp_and_no_signature() -> None:
    headers = webhook_headers("msg_1", 1700000000, b"{}", [])
    assert headers == {"webhook-id": "msg_1", "webhook-timestamp": "1700000000"}
    assert not verify(new_secret(), headers, b"{}", now=1700000000)


def test_the_webhook_id_is_the_batch_id_without_dashes() -> None:
    assert webhook_id("3f2c1e4a-0b5d-4c6e-8f70-9a1b2c3d4e5f") == "msg_3f2c1e4a0b5d4c6e8f709a1b2c3d4e5f"
    assert "." not in webhook_id("3f2c1e4a-0b5d-4c6e-8f70-9a1b2c3d4e5f")


@pytest.mark.parametrize("attempts", [1, 2, 3, 5, 8, 9, 10, 30, 1000])
def test_retries_are_fully_jittered_between_one_second_and_the_growing_cap(attempts: int) -> None:
    ceiling = min(MAX_RETRY_S, 1.0 + 2.0**attempts)
    assert webhook_retry_s(attempts, rand=0.0) == 1.0
    assert webhook_retry_s(attempts, rand=1.0) == ceiling
    samples = [webhook_retry_s(attempts) for _ in range(2000)]
    assert all(1.0 <= s <= ceiling for s in samples)
    assert len(set(samples)) > 1900  # random, not one fixed step
    assert min(samples) < 1.0 + (ceiling - 1.0) * 0.1 and max(samples) > 1.0 + (ceiling - 1.0) * 0.9


def test_retries_never_wait_more_than_ten_minutes() -> None:
    assert max(webhook_retry_s(n) for n in range(1, 200) for _ in range(20)) <= 600.0
    assert webhook_retry_s(10, rand=1.0) == 600.0


def test_a_2xx_is_delivered_410_turns_the_endpoint_off_and_anything_else_is_retried() -> None:
    for status in (200, 201, 202, 204, 299):
        assert verdict(Answer(status), 1, 8) == ("delivered", None, 0.0)
    assert verdict(Answer(410, "HTTP 410"), 1, 8) == ("failed", "endpoint gone (410)", 0.0)
    for answer in (
        Answer(500, "HTTP 500"),
        Answer(404, "HTTP 404"),
        Answer(301, "HTTP 301"),
        Answer(None, "x"),
    ):
        status, error, delay = verdict(answer, 3, 8)
        assert (status, error) == ("pending", answer.error) and 1.0 <= delay <= 9.0
    assert verdict(Answer(500, "HTTP 500"), 8, 8) == ("failed", "HTTP 500", 0.0)
    assert verdict(Answer(None, "no answer within 3 s"), 8, 8) == ("failed", "no answer within 3 s", 0.0)


def test_a_retry_waits_at_least_the_receivers_retry_after_up_to_the_cap() -> None:
    assert verdict(Answer(429, "HTTP 429", retry_after_s=120.0), 1, 8)[2] == 120.0
    assert verdict(Answer(503, "HTTP 503", retry_after_s=86400.0), 1, 8)[2] == MAX_RETRY_S
    assert verdict(Answer(503, "HTTP 503", retry_after_s=0.0), 1, 8)[2] >= 1.0
