"""A fake LLM provider that speaks OpenAI, Azure OpenAI, DeepSeek and Anthropic well enough for
their official SDKs, with realistic latency and usage, and a hard rate limit per API key that
it enforces with real 429s. It runs on one asyncio loop (`local/fake_http.py`), so thousands of
requests can wait on their answers at once without slowing each other down.

    python -m local.fake_provider --port 8600 --latency-ms 200 --limit 100 --window 2
    python -m local.fake_provider --latency-ms 3000 --latency-dist lognormal --sigma 1.0

Latency: "uniform" is latency_ms +/- jitter_ms; "lognormal" has median latency_ms and shape
sigma (1.0: p99 about 10 x the median), capped at max_latency_ms. Each answer leaves its latency
after the request's arrival (its headers and body read), when its limits were checked. A
request may ask for its own answer time: "metadata": {"fake_latency_ms": "3000"} in its body,
and to fail with a 500 every time: "metadata": {"fake_fail": "always"}.

Control endpoints (JSON):
    GET  /_fake/arrivals?key=K     wall-clock times of the key's admitted requests (the last 200,000)
    GET  /_fake/stats              requests, 429s, the most requests seen in any window, the most
                                   in flight, and the p50/p99 of the latencies chosen, per key
    POST /_fake/config             {"latency_ms", "jitter_ms", "latency_dist", "sigma",
                                    "max_latency_ms", "error_rate", "limit", "window",
                                    "keys": {"<api key>": {"limit": n, "window": s, "token_limit": n,
                                    "quota_exhausted": bool, "latency_ms": ms, "jitter_ms": ms,
                                    "latency_dist": d, "sigma": x, "max_latency_ms": ms}}}
    POST /_fake/reset              clear stats and per-key settings
    GET  /health
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import resource
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from local.fake_http import Request, Response, Server, error_response, json_response

DISTRIBUTIONS = ("uniform", "lognormal")
LATENCY_SAMPLE = 10_000  # latencies kept per key for its p50 and p99
ARRIVALS_KEPT = 200_000


@dataclass
class KeyStats:
    limit: int = 0
    window: float = 1.0
    requests: int = 0
    ok: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    max_in_window: int = 0
    over_limit: int = 0
    # The shortest time that held limit + 1 arrivals: above `window` means never over the limit.
    min_span_s: float | None = None
    token_limit: int = 0
    tokens: int = 0
    token_rate_limited: int = 0
    max_tokens_in_window: int = 0
    bucket: float = 0.0
    bucket_at: float | None = None
    first_at: float | None = None  # wall clock of the first and last admitted request
    last_at: float | None = None
    token_log: deque[tuple[float, int]] = field(default_factory=deque)
    in_flight: int = 0
    max_in_flight: int = 0
    recent: deque[float] = field(default_factory=deque)
    seen: deque[float] = field(default_factory=deque)
    admitted: deque[float] = field(default_factory=deque)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLE))
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=ARRIVALS_KEPT))  # admitted, wall


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    kind: str  # which limit answered: "requests" or "tokens"
    retry_s: float
    remaining: int
    limit: int


@dataclass
class Settings:
    latency_ms: float = 200.0
    jitter_ms: float = 50.0
    error_rate: float = 0.0
    limit: int = 0
    window: float = 1.0
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_dist: str = "uniform"
    sigma: float = 1.0
    max_latency_ms: float = 60_000.0


HIDDEN = ("seen", "admitted", "recent", "token_log", "bucket", "bucket_at", "latencies", "arrivals")
LATENCY_FIELDS = ("latency_ms", "jitter_ms", "latency_dist", "sigma", "max_latency_ms")
LIMIT_FIELDS = ("limit", "window", "token_limit")
CONFIG_FIELDS = ("error_rate", "limit", "window", *LATENCY_FIELDS)


def sample_latency_ms(
    dist: str, latency_ms: float, jitter_ms: float, sigma: float, max_latency_ms: float, rng: random.Random
) -> float:
    """One answer's latency: uniform in latency_ms +/- jitter_ms, or lognormal with median
    latency_ms and shape sigma, capped at max_latency_ms."""
    if dist == "lognormal":
        if latency_ms <= 0:
            return 0.0
        return min(max_latency_ms, rng.lognormvariate(math.log(latency_ms), sigma))
    return max(0.0, latency_ms + rng.uniform(-jitter_ms, jitter_ms))


def percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile of a sorted list."""
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 3)


def checked_config(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The global fields and the per-key entries of a /_fake/config body, converted to the
    settings' types; ValueError names the first bad one."""
    defaults = Settings()

    def convert(name: str, value: Any) -> Any:
        try:
            converted = type(getattr(defaults, name))(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: cannot use {value!r}") from None
        if name == "latency_dist" and converted not in DISTRIBUTIONS:
            raise ValueError(f"latency_dist: one of {', '.join(DISTRIBUTIONS)}")
        return converted

    top = {name: convert(name, body[name]) for name in CONFIG_FIELDS if name in body}
    keys = body.get("keys") or {}
    if not isinstance(keys, dict) or not all(isinstance(v, dict) for v in keys.values()):
        raise ValueError('keys: {"<api key>": {...}}')
    own = {
        str(k): {f: convert(f, x) if f in LATENCY_FIELDS else x for f, x in v.items()}
        for k, v in keys.items()
    }
    return top, own


class State:
    def __init__(self, settings: Settings) -> None:
        self.lock = threading.Lock()
        self.settings = settings
        self.stats: dict[str, KeyStats] = {}
        self.rng = random.Random()

    def limit_for(self, key: str) -> tuple[int, float, int]:
        """(requests, window, tokens) allowed for this key; 0 means no limit. A key's own entry
        replaces the global limit when it names any of limit, window or token_limit."""
        own = self.settings.keys.get(key)
        if own is not None and any(f in own for f in LIMIT_FIELDS):
            return (
                int(own.get("limit", 0) or 0),
                float(own.get("window", 1.0)),
                int(own.get("token_limit", 0) or 0),
            )
        return self.settings.limit, self.settings.window, 0

    def admit(self, key: str, tokens: int, now: float | None = None) -> Verdict:
        """Count the arrival (time.monotonic() at `now`) against a sliding window of requests
        and a bucket of tokens."""
        now = time.monotonic() if now is None else now
        with self.lock:
            limit, window, token_limit = self.limit_for(key)
            st = self.stats.setdefault(key, KeyStats(limit=limit, window=window))
            st.limit, st.window, st.token_limit = limit, window, token_limit
            st.requests += 1
            for q in (st.seen, st.admitted):
                while q and q[0] <= now - window:
                    q.popleft()
            while st.token_log and st.token_log[0][0] <= now - window:
                st.token_log.popleft()
            st.seen.append(now)
            if limit:
                st.recent.append(now)
                while len(st.recent) > limit + 1:
                    st.recent.popleft()
                if len(st.recent) == limit + 1:
                    span = now - st.recent[0]
                    st.min_span_s = span if st.min_span_s is None else min(st.min_span_s, span)
            st.max_in_window = max(st.max_in_window, len(st.seen))
            if limit and len(st.seen) > limit:
                st.over_limit += 1
            if limit and len(st.admitted) >= limit:
                st.rate_limited += 1
                return Verdict(False, "requests", st.admitted[0] + window - now, 0, limit)
            if token_limit:
                if st.bucket_at is None:
                    st.bucket, st.bucket_at = float(token_limit), now
                st.bucket = min(token_limit, st.bucket + (now - st.bucket_at) * token_limit / window)
                st.bucket_at = now
                if st.bucket < tokens:
                    st.rate_limited += 1
                    st.token_rate_limited += 1
                    wait = (tokens - st.bucket) * window / token_limit
                    return Verdict(False, "tokens", wait, 0, token_limit)
                st.bucket -= tokens
                st.token_log.append((now, tokens))
                st.tokens += tokens
                st.max_tokens_in_window = max(st.max_tokens_in_window, sum(n for _, n in st.token_log))
            st.admitted.append(now)
            st.last_at = time.time()
            st.first_at = st.first_at or st.last_at
            st.arrivals.append(st.last_at)
            remaining = limit - len(st.admitted) if limit else 1_000_000
            reset = st.admitted[0] + window - now if limit else 0.0
            return Verdict(True, "requests", reset, remaining, limit)

    def latency_ms(self, key: str) -> float:
        """Choose an admitted request's latency from the key's own settings or the global ones."""
        with self.lock:
            own = self.settings.keys.get(key) or {}
            p = {name: own.get(name, getattr(self.settings, name)) for name in LATENCY_FIELDS}
            ms = sample_latency_ms(
                p["latency_dist"], p["latency_ms"], p["jitter_ms"], p["sigma"], p["max_latency_ms"], self.rng
            )
            self.stats[key].latencies.append(ms)
        return ms

    def flight(self, key: str, step: int) -> None:
        with self.lock:
            st = self.stats[key]
            st.in_flight += step
            st.max_in_flight = max(st.max_in_flight, st.in_flight)

    def record(self, key: str, ok: bool) -> None:
        with self.lock:
            st = self.stats[key]
            if ok:
                st.ok += 1
            else:
                st.server_errors += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            keys: dict[str, dict[str, Any]] = {}
            for k, s in self.stats.items():
                row = {f.name: getattr(s, f.name) for f in fields(s) if f.name not in HIDDEN}
                ordered = sorted(s.latencies)
                row["latency_ms_p50"] = percentile(ordered, 0.50)
                row["latency_ms_p99"] = percentile(ordered, 0.99)
                keys[k] = row
            config = asdict(self.settings)
        total = {
            f: sum(k[f] for k in keys.values())
            for f in ("requests", "ok", "rate_limited", "server_errors", "over_limit")
        }
        return {"total": total, "keys": keys, "config": config}


def tokens(text: str) -> int:
    """A rough tokenizer: about four characters a token, as OpenAI documents for English."""
    return max(1, math.ceil(len(text) / 4))


def reply_for(prompt: str, max_tokens: int | None) -> tuple[str, int]:
    text = f"Echo: {prompt}"
    if max_tokens is not None and tokens(text) > max_tokens:
        text = text[: max_tokens * 4]
    return text, tokens(text)


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def openai_completion(body: dict[str, Any], model: str) -> dict[str, Any]:
    messages = body.get("messages") or []
    prompt = next((content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    text, out_tokens = reply_for(prompt, body.get("max_tokens") or body.get("max_completion_tokens"))
    in_tokens = sum(tokens(content_text(m.get("content"))) + 4 for m in messages) + 3
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": in_tokens,
            "completion_tokens": out_tokens,
            "total_tokens": in_tokens + out_tokens,
        },
    }


def anthropic_message(body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages") or []
    prompt = next((content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    text, out_tokens = reply_for(prompt, body.get("max_tokens"))
    in_tokens = sum(tokens(content_text(m.get("content"))) for m in messages)
    in_tokens += tokens(content_text(body.get("system") or "")) if body.get("system") else 0
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "claude"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens},
    }


def not_found(path: str) -> Response:
    return json_response(404, {"error": {"message": f"unknown path {path}", "type": "invalid_request_error"}})


def error(
    dialect: str, status: int, kind: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    if dialect == "anthropic":
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {
            "error": {
                "message": message,
                "type": kind,
                "param": None,
                "code": "rate_limit_exceeded" if kind == "requests" else kind,
            }
        }
    return json_response(status, body, headers)


def requested_failure(body: dict[str, Any]) -> bool:
    """A request may ask to be answered 500 every time: `"metadata": {"fake_fail": "always"}`
    (a poison message, for the fault tests)."""
    metadata = body.get("metadata")
    return isinstance(metadata, dict) and metadata.get("fake_fail") == "always"


def requested_latency_ms(body: dict[str, Any]) -> float | None:
    """A request may ask for its own answer time: `"metadata": {"fake_latency_ms": "3000"}`
    (OpenAI's `metadata` takes string values; Anthropic's carries only `user_id`, so there it
    is read the same way, for tests)."""
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        try:
            return float(metadata["fake_latency_ms"])
        except (KeyError, TypeError, ValueError):
            return None
    return None


class App:
    """The fake provider's routes: one coroutine per request, on the server's loop."""

    def __init__(self, state: State) -> None:
        self.state = state

    async def __call__(self, req: Request) -> Response:
        url = urlsplit(req.target)
        if req.method == "GET":
            if url.path == "/_fake/stats":
                return json_response(200, self.state.snapshot())
            if url.path == "/_fake/arrivals":
                key = (parse_qs(url.query).get("key") or [""])[0]
                with self.state.lock:
                    st = self.state.stats.get(key)
                    arrivals = list(st.arrivals) if st else []
                return json_response(200, {"key": key, "arrivals": arrivals})
            if url.path == "/health":
                return json_response(200, {"status": "ok"})
            return json_response(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        if req.method != "POST":
            return error_response(501, f"unsupported method {req.method}")
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            return error_response(400, "invalid JSON body")
        if not isinstance(body, dict):
            return error_response(400, "the body must be a JSON object")
        path = url.path
        headers = req.headers
        bearer = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if path == "/_fake/config":
            return self.configure(body)
        if path == "/_fake/reset":
            with self.state.lock:
                self.state.stats.clear()
                self.state.settings.keys.clear()
            return json_response(200, {"reset": True})
        if path in ("/v1/chat/completions", "/chat/completions"):
            return await self.chat(req, "openai", bearer, body, str(body.get("model", "gpt-4o-mini")))
        if path.startswith("/openai/deployments/") and path.endswith("/chat/completions"):
            if "api-version" not in parse_qs(url.query):
                return json_response(404, {"error": {"code": "404", "message": "Resource not found"}})
            deployment = path.split("/")[3]
            return await self.chat(req, "openai", headers.get("api-key") or bearer, body, deployment)
        if path == "/v1/messages":
            return await self.chat(req, "anthropic", headers.get("x-api-key") or bearer, body, "")
        return not_found(path)

    def configure(self, body: dict[str, Any]) -> Response:
        try:
            top, keys = checked_config(body)
        except ValueError as e:
            return error_response(400, str(e))
        with self.state.lock:
            s = self.state.settings
            for name, value in top.items():
                setattr(s, name, value)
            s.keys.update(keys)
            current = asdict(s)
        return json_response(200, current)

    async def chat(self, req: Request, dialect: str, key: str, body: dict[str, Any], model: str) -> Response:
        if not key:
            return error(dialect, 401, "authentication_error", "No API key provided.")
        if not body.get("messages"):
            return error(dialect, 400, "invalid_request_error", "messages: field required")
        if self.state.settings.keys.get(key, {}).get("quota_exhausted"):
            return error(
                dialect,
                429,
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing details.",
            )
        out = anthropic_message(body) if dialect == "anthropic" else openai_completion(body, model)
        used = out["usage"]
        if dialect == "anthropic":  # the tokens actually used
            cost = used["input_tokens"] + used["output_tokens"]
        else:  # as OpenAI counts: the prompt plus max_tokens, whatever the answer's length
            ceiling = body.get("max_tokens") or body.get("max_completion_tokens") or 0
            cost = used["prompt_tokens"] + max(int(ceiling), used["completion_tokens"])
        v = self.state.admit(key, cost, now=req.arrived)
        reset = datetime.now(UTC) + timedelta(seconds=v.retry_s)
        kind = v.kind
        if dialect == "anthropic":
            headers = {
                f"anthropic-ratelimit-{kind}-limit": str(v.limit),
                f"anthropic-ratelimit-{kind}-remaining": str(v.remaining),
                f"anthropic-ratelimit-{kind}-reset": reset.isoformat(),
            }
        else:
            headers = {
                f"x-ratelimit-limit-{kind}": str(v.limit),
                f"x-ratelimit-remaining-{kind}": str(v.remaining),
                f"x-ratelimit-reset-{kind}": f"{v.retry_s:.3f}s",
            }
        if not v.admitted:
            headers["retry-after"] = str(max(1, math.ceil(v.retry_s)))
            headers["retry-after-ms"] = str(max(1, math.ceil(v.retry_s * 1000)))
            error_kind = "rate_limit_error" if dialect == "anthropic" else kind
            message = f"Rate limit reached: {v.limit} {kind} per window."
            return error(dialect, 429, error_kind, message, headers)
        due = req.arrived + (requested_latency_ms(body) or self.state.latency_ms(key)) / 1000
        self.state.flight(key, +1)
        try:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        finally:
            self.state.flight(key, -1)
        s = self.state.settings
        if requested_failure(body) or (s.error_rate and self.state.rng.random() < s.error_rate):
            self.state.record(key, ok=False)
            return error(
                dialect,
                500,
                "api_error" if dialect == "anthropic" else "server_error",
                "The server had an error while processing your request.",
            )
        self.state.record(key, ok=True)
        headers["x-request-id"] = f"req_{uuid.uuid4().hex[:16]}"
        return json_response(200, out, headers)


def serve(host: str, port: int, settings: Settings) -> Server:
    """A bound server (port 0 picks a free one); run serve_forever() in a thread or in main."""
    return Server((host, port), App(State(settings)))


def raise_open_files_limit() -> None:
    """Let the process hold as many sockets as its hard limit allows (the soft one is often 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


IDLE_S = 1.0  # no request for this long: the garbage collector may make its full pass
FULL_PASS_EVERY = 10_000  # second-generation passes before a full one (CPython's default: 10)


def collect_when_idle(server: Server) -> None:
    """The garbage collector's full passes, only while no request is being answered. One
    pauses the server for as long as it takes to walk every object (tens of milliseconds with
    thousands of connections open), and requests that arrive meanwhile would be read, and
    timed, together at its end: a window would look fuller than it was, and a limit be held
    against a burst the client never sent. Answering leaves next to no cyclic garbage, so the
    passes can wait; between idle moments they come a thousand times less often than by
    default. What serving needs for good (the imports, the loop) is never walked again."""
    gc.freeze()
    gc.set_threshold(*gc.get_threshold()[:2], FULL_PASS_EVERY)

    def watch() -> None:
        collected_at = time.monotonic()
        while True:
            time.sleep(IDLE_S)
            handling, last = server.requests_seen()
            if handling == 0 and last > collected_at and time.monotonic() - last >= IDLE_S:
                gc.collect()
                collected_at = time.monotonic()

    threading.Thread(target=watch, name="collect-when-idle", daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--jitter-ms", type=float, default=50.0)
    parser.add_argument("--latency-dist", choices=DISTRIBUTIONS, default="uniform")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal shape")
    parser.add_argument("--max-latency-ms", type=float, default=60_000.0, help="lognormal cap")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=0, help="requests per window, 0 = none")
    parser.add_argument("--window", type=float, default=1.0)
    a = parser.parse_args()
    raise_open_files_limit()
    with contextlib.suppress(OSError):
        # It stands for a provider on servers of its own: where allowed (as root), it goes
        # before the stack it serves on this machine's cores, so that its arrival times (the
        # ones its limits are held to) are not late by the time the workers take from it.
        os.nice(-10)
    settings = Settings(
        a.latency_ms,
        a.jitter_ms,
        a.error_rate,
        a.limit,
        a.window,
        latency_dist=a.latency_dist,
        sigma=a.sigma,
        max_latency_ms=a.max_latency_ms,
    )
    server = serve(a.host, a.port, settings)
    collect_when_idle(server)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"fake provider on http://{a.host}:{a.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
