"""How SDK exceptions map to retryable and permanent errors (no network)."""

from __future__ import annotations

import threading

import anthropic
import httpx2
import openai
import pytest
from ai_rate_limiter.adapters.providers import classify, openai_base_url
from ai_rate_limiter.domain.models import Provider, ProviderType
from ai_rate_limiter.errors import ProviderRejected, ProviderUnavailable, QuotaExhausted, RateLimited

KEY = "sk-secret-abcdefghijkl"
P = Provider(id="p", name="P", type=ProviderType.OPENAI, api_key=KEY, limit=1, time_window=1)


def status_error(
    sdk: type, status: int, body: dict[str, object], headers: dict[str, str] | None = None
) -> Exception:
    """The exception the SDK itself raises for this HTTP response."""
    request = httpx2.Request("POST", "http://fake/v1/chat/completions")
    response = httpx2.Response(status, json=body, headers=headers or {}, request=request)
    client = sdk.OpenAI(api_key="x") if sdk is openai else sdk.Anthropic(api_key="x")
    return client._make_status_error_from_response(response)


@pytest.mark.parametrize("sdk", [openai, anthropic])
def test_429_is_rate_limited_with_retry_after(sdk: type) -> None:
    err = classify(status_error(sdk, 429, {"error": {"message": "slow down"}}, {"retry-after-ms": "250"}), P)
    assert isinstance(err, RateLimited)
    assert err.retry_after_s == 0.25


def test_insufficient_quota_is_permanent() -> None:
    err = classify(
        status_error(
            openai, 429, {"error": {"code": "insufficient_quota", "message": "You exceeded your quota"}}
        ),
        P,
    )
    assert isinstance(err, QuotaExhausted)


@pytest.mark.parametrize("status", [500, 502, 503, 529])
def test_5xx_is_retryable(status: int) -> None:
    assert isinstance(
        classify(status_error(anthropic, status, {"error": {"message": "x"}}), P), ProviderUnavailable
    )


def test_other_4xx_fail_at_once_with_the_providers_message_and_no_key() -> None:
    err = classify(status_error(openai, 401, {"error": {"message": f"Incorrect API key {KEY}"}}), P)
    assert isinstance(err, ProviderRejected) and not err.retryable
    assert "Incorrect API key" in err.detail and KEY not in err.detail


def test_timeouts_are_retryable() -> None:
    request = httpx2.Request("POST", "http://fake")
    assert isinstance(classify(openai.APITimeoutError(request), P), ProviderUnavailable)
    assert isinstance(classify(anthropic.APIConnectionError(request=request), P), ProviderUnavailable)


def test_openai_endpoints_written_without_v1_get_it() -> None:
    assert openai_base_url(P) == "https://api.openai.com/v1"
    seed = Provider(**{**P.__dict__, "config": {"endpoint": "https://api.openai.com"}})
    assert openai_base_url(seed) == "https://api.openai.com/v1"
    deepseek = Provider(**{**P.__dict__, "type": ProviderType.DEEPSEEK})
    assert openai_base_url(deepseek) == "https://api.deepseek.com"


def test_clients_are_built_before_the_first_slot_for_every_pool() -> None:
    """Building the first client of a process takes tens of milliseconds (the TLS context):
    `prepare` does it before any request has a slot, for each pool a thread may use."""
    from concurrent.futures import ThreadPoolExecutor

    from ai_rate_limiter.adapters.providers import CONNECTIONS_PER_POOL, ProviderGateway

    made: list[int] = []

    def make_http(n: int) -> httpx2.Client:
        made.append(n)
        return httpx2.Client()

    gateway = ProviderGateway(make_http, timeout_s=5, max_connections=6 * CONNECTIONS_PER_POOL)
    gateway.prepare([P])
    assert made == [CONNECTIONS_PER_POOL] * 6 and len(gateway._clients) == 6
    together = threading.Barrier(12)  # twelve threads at once: two for each pool

    def client_of_a_thread(_: int) -> int:
        together.wait(5)
        return id(gateway._client(P))

    with ThreadPoolExecutor(12) as pool:
        clients = set(pool.map(client_of_a_thread, range(12)))
    assert len(made) == 6 and len(clients) == 6  # nothing more was built


def test_an_answer_with_nul_characters_is_kept_with_them_replaced() -> None:
    """Postgres stores no NUL (`jsonb` refuses \\u0000): the paid answer is stored with U+FFFD."""
    from ai_rate_limiter.adapters.providers import answer_json

    raw = httpx2.Response(200, content=b'{"choices": [{"message": {"content": "a\\u0000b"}}], "k\\u0000": 1}')
    body = answer_json(raw, P)
    assert body == {"choices": [{"message": {"content": "a\ufffdb"}}], "k\ufffd": 1}


def test_an_answer_of_absurd_size_fails_its_message_saying_so() -> None:
    from ai_rate_limiter.adapters.providers import MAX_ANSWER_BYTES, answer_json

    raw = httpx2.Response(200, content=b'{"x": "' + b"a" * MAX_ANSWER_BYTES + b'"}')
    with pytest.raises(ProviderRejected, match="bytes, over the"):
        answer_json(raw, P)
