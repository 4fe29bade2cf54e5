"""A fake LLM provider that speaks OpenAI, Azure OpenAI, DeepSeek and Anthropic well enough for
their official SDKs, with realistic latency and usage, and a hard rate limit per API key that
it enforces with real 429s.

    python -m local.fake_provider --port 8600 --latency-ms 200 --limit 100 --window 2

Control endpoints (JSON):
    GET  /_fake/stats              requests, 429s and the most requests seen in any window, per key
    POST /_fake/config             {"latency_ms", "jitter_ms", "error_rate", "limit", "window",
                                    "keys": {"<api key>": {"limit": n, "window": s}}}
    POST /_fake/reset              clear stats and per-key limits
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


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


HIDDEN = ("seen", "admitted", "recent", "token_log", "bucket", "bucket_at")


class State:
    def __init__(self, settings: Settings) -> None:
        self.lock = threading.Lock()
        self.settings = settings
        self.stats: dict[str, KeyStats] = {}

    def limit_for(self, key: str) -> tuple[int, float, int]:
        """(requests, window, tokens) allowed for this key; 0 means no limit."""
        own = self.settings.keys.get(key)
        if own is not None:
            return (
                int(own.get("limit", 0) or 0),
                float(own.get("window", 1.0)),
                int(own.get("token_limit", 0) or 0),
            )
        return self.settings.limit, self.settings.window, 0

    def admit(self, key: str, tokens: int) -> Verdict:
        """Count the arrival against a sliding window of requests and a bucket of tokens."""
        now = time.monotonic()
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
            st.first_at = st.first_at or time.time()
            st.last_at = time.time()
            remaining = limit - len(st.admitted) if limit else 1_000_000
            reset = st.admitted[0] + window - now if limit else 0.0
            return Verdict(True, "requests", reset, remaining, limit)

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
            keys = {k: {f: v for f, v in asdict(s).items() if f not in HIDDEN} for k, s in self.stats.items()}
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeProvider/1.0"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    state: State

    def log_message(self, format: str, *args: Any) -> None:
        return

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def read_json(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw or b"{}")

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/_fake/stats":
            self.send_json(200, self.state.snapshot())
        elif urlsplit(self.path).path == "/health":
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        try:
            body = self.read_json()
        except ValueError:
            self.send_json(400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}})
            return
        path = url.path
        bearer = (self.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        if path == "/_fake/config":
            self.configure(body)
        elif path == "/_fake/reset":
            with self.state.lock:
                self.state.stats.clear()
                self.state.settings.keys.clear()
            self.send_json(200, {"reset": True})
        elif path in ("/v1/chat/completions", "/chat/completions"):
            self.chat("openai", bearer, body, str(body.get("model", "gpt-4o-mini")))
        elif path.startswith("/openai/deployments/") and path.endswith("/chat/completions"):
            if "api-version" not in parse_qs(url.query):
                self.send_json(404, {"error": {"code": "404", "message": "Resource not found"}})
                return
            deployment = path.split("/")[3]
            self.chat("openai", self.headers.get("api-key") or bearer, body, deployment)
        elif path == "/v1/messages":
            self.chat("anthropic", self.headers.get("x-api-key") or bearer, body, "")
        else:
            self.send_json(
                404, {"error": {"message": f"unknown path {path}", "type": "invalid_request_error"}}
            )

    def configure(self, body: dict[str, Any]) -> None:
        with self.state.lock:
            s = self.state.settings
            for name in ("latency_ms", "jitter_ms", "error_rate", "limit", "window"):
                if name in body:
                    setattr(s, name, type(getattr(s, name))(body[name]))
            s.keys.update(body.get("keys") or {})
            current = asdict(s)
        self.send_json(200, current)

    def error(
        self, dialect: str, status: int, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
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
        self.send_json(status, body, headers)

    def chat(self, dialect: str, key: str, body: dict[str, Any], model: str) -> None:
        if not key:
            self.error(dialect, 401, "authentication_error", "No API key provided.")
            return
        if not body.get("messages"):
            self.error(dialect, 400, "invalid_request_error", "messages: field required")
            return
        if self.state.settings.keys.get(key, {}).get("quota_exhausted"):
            self.error(
                dialect,
                429,
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing details.",
            )
            return
        out = anthropic_message(body) if dialect == "anthropic" else openai_completion(body, model)
        used = out["usage"]
        if dialect == "anthropic":  # the tokens actually used
            cost = used["input_tokens"] + used["output_tokens"]
        else:  # as OpenAI counts: the prompt plus max_tokens, whatever the answer's length
            ceiling = body.get("max_tokens") or body.get("max_completion_tokens") or 0
            cost = used["prompt_tokens"] + max(int(ceiling), used["completion_tokens"])
        v = self.state.admit(key, cost)
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
            self.error(dialect, 429, error_kind, f"Rate limit reached: {v.limit} {kind} per window.", headers)
            return
        s = self.state.settings
        delay = max(0.0, s.latency_ms + random.uniform(-s.jitter_ms, s.jitter_ms)) / 1000
        self.state.flight(key, +1)
        try:
            time.sleep(delay)
        finally:
            self.state.flight(key, -1)
        if s.error_rate and random.random() < s.error_rate:
            self.state.record(key, ok=False)
            self.error(
                dialect,
                500,
                "api_error" if dialect == "anthropic" else "server_error",
                "The server had an error while processing your request.",
            )
            return
        self.state.record(key, ok=True)
        headers["x-request-id"] = f"req_{uuid.uuid4().hex[:16]}"
        self.send_json(200, out, headers)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512


def serve(host: str, port: int, settings: Settings) -> Server:
    handler = type("BoundHandler", (Handler,), {"state": State(settings)})
    return Server((host, port), handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8600)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--jitter-ms", type=float, default=50.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=0, help="requests per window, 0 = none")
    parser.add_argument("--window", type=float, default=1.0)
    a = parser.parse_args()
    server = serve(a.host, a.port, Settings(a.latency_ms, a.jitter_ms, a.error_rate, a.limit, a.window))
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
