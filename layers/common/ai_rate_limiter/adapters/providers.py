"""Provider calls through the official SDKs: `openai` (OpenAI, Azure, DeepSeek), `anthropic`."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx2
import openai

from ..domain.backoff import retry_after_s
from ..domain.models import ChatRequest, Provider, ProviderResult, ProviderType, Usage
from ..domain.tokens import DEFAULT_MAX_TOKENS
from ..errors import (
    LateForSlot,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    QuotaExhausted,
    RateLimited,
)
from .egress import Departure, departing

DEFAULT_AZURE_API_VERSION = "2024-10-21"
ANTHROPIC_DEFAULT_MAX_TOKENS = DEFAULT_MAX_TOKENS
SDK_ERRORS = (openai.APIError, anthropic.APIError)


def openai_base_url(provider: Provider) -> str | None:
    """The seed writes endpoints as `https://api.openai.com`; the SDK wants the `/v1` base."""
    endpoint = provider.endpoint
    if endpoint and provider.type is ProviderType.OPENAI and urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + "/v1"
    return endpoint


def scrub(text: str, provider: Provider) -> str:
    return text.replace(provider.api_key, "****") if provider.api_key else text


def classify(exc: Exception, provider: Provider) -> ProviderError:
    """Map an SDK exception to retryable / permanent errors of our own."""
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return ProviderUnavailable(f"{provider.name}: request timed out")
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        return ProviderUnavailable(f"{provider.name}: connection failed")
    status = getattr(exc, "status_code", None)
    response = getattr(exc, "response", None)
    headers = dict(response.headers) if isinstance(response, httpx2.Response) else {}
    message = scrub(f"{provider.name}: HTTP {status}: {getattr(exc, 'message', exc)}", provider)
    if status == 429:
        if "insufficient_quota" in str(getattr(exc, "body", "") or "") + message:
            return QuotaExhausted(message)
        return RateLimited(message, retry_after_s(headers))
    if status is not None and (status >= 500 or status in (408, 409)):
        return ProviderUnavailable(message, retry_after_s(headers))
    return ProviderRejected(message)


CONNECTIONS_PER_POOL = 10


class ProviderGateway:
    """Builds SDK clients per provider version and calls them; thread-safe.

    The HTTP connection pool does work in proportion to its connections on every request, so
    instead of one pool of `max_connections` there are pools of CONNECTIONS_PER_POOL, each
    thread keeping to one of them (`make_http(n)` makes a client of n connections)."""

    def __init__(
        self, make_http: Callable[[int], httpx2.Client], timeout_s: float, max_connections: int = 100
    ) -> None:
        self.make_http = make_http
        self.timeout_s = timeout_s
        self.pools = max(1, math.ceil(max_connections / CONNECTIONS_PER_POOL))
        self.per_pool = math.ceil(max_connections / self.pools)
        self._http: dict[int, httpx2.Client] = {}
        self._clients: dict[tuple[str, str, int], Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._next = itertools.count()

    def _pool(self) -> int:
        pool: int | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = next(self._next) % self.pools
        return pool

    def prepare(self, providers: Sequence[Provider]) -> None:
        """Build every pool's client of these providers now: the first client of a process
        also builds the shared TLS context, tens of milliseconds that would otherwise pass
        between a request's slot and its departure and hold the request back."""
        for p in providers:
            for pool in range(self.pools):
                self._client(p, pool)

    def _client(self, p: Provider, pool: int | None = None) -> Any:
        """Built outside the lock (a thread building one must not hold up the others' calls);
        of two built at once, the first stored is kept."""
        pool = self._pool() if pool is None else pool
        key = (p.id, p.version, pool)
        client = self._clients.get(key)
        if client is not None:
            return client
        http = self._http.get(pool)
        if http is None:
            made = self.make_http(self.per_pool)
            with self._lock:
                http = self._http.setdefault(pool, made)
            if http is not made:
                made.close()
        built = self._build(p, http)
        with self._lock:
            for old in [k for k in self._clients if k[0] == p.id and k[1] != p.version]:
                del self._clients[old]  # a provider changed (a new key, say): its old clients go
            return self._clients.setdefault(key, built)

    def _build(self, p: Provider, http: httpx2.Client) -> Any:
        common: dict[str, Any] = {
            "api_key": p.api_key,
            "max_retries": 0,
            "timeout": self.timeout_s,
            "http_client": http,
        }
        if p.type is ProviderType.ANTHROPIC:
            return anthropic.Anthropic(base_url=p.endpoint, **common)
        if p.type is ProviderType.AZURE:
            return openai.AzureOpenAI(
                azure_endpoint=str(p.endpoint),
                api_version=p.config.get("api_version") or DEFAULT_AZURE_API_VERSION,
                azure_deployment=p.config.get("deployment") or p.model,
                **common,
            )
        return openai.OpenAI(base_url=openai_base_url(p), **common)

    def call(self, p: Provider, req: ChatRequest, departure: Departure | None = None) -> ProviderResult:
        """The provider's answer; with a `departure`, the request leaves by its time or not at
        all (`departure.on_late`'s error)."""
        started = time.monotonic()
        client = self._client(p)  # built before the clock starts: the first one takes a while
        departing(departure)
        try:
            if p.type is ProviderType.ANTHROPIC:
                text, usage, raw, model, headers = self._anthropic(client, p, req)
            else:
                text, usage, raw, model, headers = self._openai(client, p, req)
        except SDK_ERRORS as exc:
            if departure is not None and isinstance(exc.__cause__, LateForSlot):
                raise exc.__cause__ from None
            raise classify(exc, p) from None
        finally:
            departing(None)
        latency_ms = int((time.monotonic() - started) * 1000)
        return ProviderResult(text, usage, raw, latency_ms, model, headers)

    @staticmethod
    def _params(p: Provider, req: ChatRequest) -> dict[str, Any]:
        params: dict[str, Any] = {"model": req.model or p.model}
        max_tokens = req.max_tokens or p.config.get("max_tokens")
        temperature = req.temperature if req.temperature is not None else p.config.get("temperature")
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if temperature is not None:
            params["temperature"] = temperature
        return {**params, **req.extra}

    def _openai(self, client: Any, p: Provider, req: ChatRequest) -> tuple[Any, ...]:
        messages = list(req.messages)
        if req.system:
            messages.insert(0, {"role": "system", "content": req.system})
        params = self._params(p, req)
        raw = post(client, "/chat/completions", {"messages": messages, **params}, self.timeout_s)
        body = answer_json(raw, p)
        choices = body.get("choices") or [{}]
        text = (choices[0].get("message") or {}).get("content") or ""
        usage = body.get("usage") or {}
        counts = Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        return text, counts, body, body.get("model", params["model"]), dict(raw.headers)

    def _anthropic(self, client: Any, p: Provider, req: ChatRequest) -> tuple[Any, ...]:
        params = self._params(p, req)
        params.setdefault("max_tokens", ANTHROPIC_DEFAULT_MAX_TOKENS)
        if req.system:
            params["system"] = req.system
        raw = post(client, "/v1/messages", {"messages": list(req.messages), **params}, self.timeout_s)
        body = answer_json(raw, p)
        text = "".join(str(b.get("text", "")) for b in body.get("content") or [] if b.get("type") == "text")
        usage = body.get("usage") or {}
        counts = Usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))
        return text, counts, body, body.get("model", params["model"]), dict(raw.headers)


def post(client: Any, path: str, body: dict[str, Any], timeout_s: float) -> httpx2.Response:
    """The request through the SDK's generic `post` (its documented way to send a request as
    given): the client's base URL, auth headers, Azure deployment routing, timeout and error
    types all apply. The typed methods would first walk the request against their type hints,
    a fifth of each call's cost, with nothing to convert in a request that arrived as JSON."""
    response: httpx2.Response = client.post(
        path, cast_to=httpx2.Response, body=body, options={"timeout": timeout_s}
    )
    return response


MAX_ANSWER_BYTES = 4 * 1024 * 1024  # an answer longer than this fails its message, said plainly


def answer_json(raw: httpx2.Response, p: Provider) -> dict[str, Any]:
    """The answer's JSON as the provider sent it (kept whole beside the extracted text), but
    with every NUL character replaced by U+FFFD: Postgres stores no NUL, and a paid answer
    must not fail on one."""
    size = len(raw.content)
    if size > MAX_ANSWER_BYTES:
        raise ProviderRejected(f"{p.name}: the answer was {size} bytes, over the {MAX_ANSWER_BYTES} kept")
    try:
        body = raw.json()
    except ValueError:
        raise ProviderUnavailable(f"{p.name}: the answer was not JSON") from None
    if not isinstance(body, dict):
        raise ProviderUnavailable(f"{p.name}: the answer was not a JSON object")
    if b"\\u0000" in raw.content:  # the only way a NUL can be in JSON text
        body = without_nul(body)
    return body


def without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value
