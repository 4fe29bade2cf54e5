"""The fake provider on loopback: concurrency, latency, limits, HTTP/1.1 and the official SDKs.

It needs no database, Redis or RabbitMQ: only the `fake` fixture (a server in a thread).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import re
import socket
import statistics
import threading
import time
from typing import Any

import anthropic
import httpx
import openai
import pytest

from local import fake_provider
from local.fake_provider import sample_latency_ms
from tests.conftest import FakeProvider, random_key

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def post_raw(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, float]:
    """POST on a connection of its own with a bare asyncio client: (status, seconds taken).

    Not httpx: its connection pool does work in proportion to its connections on every request
    and answer, so 1,000 at once through one AsyncClient took about 25 s here, all of it in the
    client, and twenty clients of 50 connections each still about 3 s; this measures the server."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"content-length: {len(data)}\r\n\r\n"
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode() + data)
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = next(int(h.split(":", 1)[1]) for h in lines if h.lower().startswith("content-length:"))
        await reader.readexactly(length)
        return int(status_line.split(" ")[1]), time.monotonic() - started
    finally:
        writer.close()


def test_a_thousand_requests_in_flight_each_take_the_latency(fake: FakeProvider) -> None:
    fake_provider.raise_open_files_limit()  # 1,000 client and 1,000 server sockets in this process
    fake.configure(latency_ms=1000, jitter_ms=0, latency_dist="uniform")
    key = random_key()

    async def run() -> tuple[float, list[tuple[int, float]]]:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(post_raw(fake.url, "/v1/chat/completions", CHAT, bearer(key)) for _ in range(1000))
        )
        return time.monotonic() - started, answers

    wall, answers = asyncio.run(run())
    stats = fake.stats()["keys"][key]
    print(f"\n1,000 in flight: wall {wall:.3f}s, max_in_flight {stats['max_in_flight']}")
    assert [status for status, _ in answers] == [200] * 1000
    assert min(took for _, took in answers) >= 1.0
    assert wall >= 1.0
    assert stats["ok"] == 1000 and stats["in_flight"] == 0
    # Held at once, not one after another: how long the whole took is the host's, and `make bench` shows it.
    assert stats["max_in_flight"] >= 900
    assert stats["latency_ms_p50"] == stats["latency_ms_p99"] == 1000


def test_an_httpx_async_client_keeps_a_hundred_in_flight(fake: FakeProvider) -> None:
    fake.configure(latency_ms=500, jitter_ms=0)
    key = random_key()

    async def run() -> list[tuple[int, float]]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:

            async def one() -> tuple[int, float]:
                started = time.monotonic()
                r = await client.post(f"{fake.url}/v1/chat/completions", json=CHAT, headers=bearer(key))
                return r.status_code, time.monotonic() - started

            # No more requests than connections: httpx's pool slows down badly when they queue.
            return await asyncio.gather(*(one() for _ in range(100)))

    answers = asyncio.run(run())
    assert [status for status, _ in answers] == [200] * 100
    assert min(took for _, took in answers) >= 0.5
    assert fake.stats()["keys"][key]["max_in_flight"] >= 90


def test_a_sliding_window_of_ten_admits_ten_of_fifteen(fake: FakeProvider) -> None:
    key = random_key()
    fake.configure(keys={key: {"limit": 10, "window": 1.0}})

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=15), timeout=10) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{fake.url}/v1/chat/completions", json=CHAT, headers=bearer(key))
                    for _ in range(15)
                )
            )

    answers = asyncio.run(run())
    assert sorted(r.status_code for r in answers) == [200] * 10 + [429] * 5
    for r in answers:
        assert r.headers["x-ratelimit-limit-requests"] == "10"
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= 1
            assert 0 < int(r.headers["retry-after-ms"]) <= 1000
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
    stats = fake.stats()["keys"][key]
    assert (stats["ok"], stats["rate_limited"], stats["max_in_window"], stats["over_limit"]) == (10, 5, 15, 5)


def test_lognormal_latency_has_the_median_and_a_heavy_tail() -> None:
    rng = random.Random(1234)
    samples = sorted(sample_latency_ms("lognormal", 1000, 0, 1.0, 60_000, rng) for _ in range(2000))
    median = statistics.median(samples)
    p99 = samples[int(0.99 * len(samples)) - 1]
    assert abs(median - 1000) <= 150
    assert p99 >= 6 * median
    capped = [sample_latency_ms("lognormal", 1000, 0, 1.0, 3000, rng) for _ in range(2000)]
    assert max(capped) == 3000
    uniform = [sample_latency_ms("uniform", 100, 20, 1.0, 60_000, rng) for _ in range(2000)]
    assert min(uniform) >= 80 and max(uniform) <= 120


def test_a_key_has_its_own_latency_and_reports_its_percentiles(fake: FakeProvider) -> None:
    slow, fast = random_key(), random_key()
    fake.configure(keys={slow: {"latency_ms": 300, "jitter_ms": 0}, fast: {"latency_dist": "lognormal"}})
    with httpx.Client(base_url=fake.url) as client:
        started = time.monotonic()
        assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(slow)).status_code == 200
        assert time.monotonic() - started >= 0.3
        for _ in range(20):
            assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(fast)).status_code == 200
    keys = fake.stats()["keys"]
    assert keys[slow]["latency_ms_p50"] == keys[slow]["latency_ms_p99"] == 300
    assert 0 < keys[fast]["latency_ms_p50"] <= keys[fast]["latency_ms_p99"]
    assert keys[fast]["limit"] == 0  # a latency-only entry keeps the global limit (none here)


def test_config_rejects_an_unknown_distribution(fake: FakeProvider) -> None:
    r = httpx.post(f"{fake.url}/_fake/config", json={"latency_dist": "pareto", "latency_ms": 1})
    assert r.status_code == 400
    assert fake.stats()["config"]["latency_dist"] == "uniform"
    assert fake.configure(latency_dist="lognormal", sigma=0.5)["sigma"] == 0.5


def test_one_connection_carries_fifty_requests(fake: FakeProvider) -> None:
    host, port = fake.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    ports = set()
    try:
        for i in range(50):
            body = b'{"messages": [{"role": "user", "content": "n%d"}]}' % i
            conn.request("POST", "/v1/chat/completions", body=body, headers=bearer("sk-keepalive"))
            r = conn.getresponse()
            assert r.status == 200 and r.getheader("connection") is None
            assert b"Echo: n%d" % i in r.read()
            assert conn.sock is not None
            ports.add(conn.sock.getsockname()[1])
    finally:
        conn.close()
    assert len(ports) == 1
    assert fake.stats()["keys"]["sk-keepalive"]["ok"] == 50


def test_pipelined_requests_are_answered_in_order(fake: FakeProvider) -> None:
    paths = ["/health", "/nope", "/_fake/stats"]
    raw = b"".join(b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % p.encode() for p in paths)
    answer = exchange(fake, raw + b"GET /health HTTP/1.1\r\nconnection: close\r\n\r\n")
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"404", b"200", b"200"]


def test_the_official_sdks_get_completions(fake: FakeProvider) -> None:
    oa = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="sk-sdk-openai", max_retries=0)
    chat = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == "Echo: hi" and chat.usage is not None

    azure = openai.AzureOpenAI(
        azure_endpoint=fake.url, api_key="sk-sdk-azure", api_version="2024-06-01", max_retries=0
    )
    chat = azure.chat.completions.create(model="my-deployment", messages=[{"role": "user", "content": "az"}])
    assert chat.choices[0].message.content == "Echo: az" and chat.model == "my-deployment"

    an = anthropic.Anthropic(base_url=fake.url, api_key="sk-sdk-anthropic", max_retries=0)
    msg = an.messages.create(
        model="claude-3-5-haiku-latest", max_tokens=64, messages=[{"role": "user", "content": "yo"}]
    )
    assert msg.content[0].type == "text" and msg.content[0].text == "Echo: yo"

    keys = fake.stats()["keys"]
    assert all(keys[k]["ok"] == 1 for k in ("sk-sdk-openai", "sk-sdk-azure", "sk-sdk-anthropic"))


def test_the_sdks_see_429s_with_their_headers(fake: FakeProvider) -> None:
    fake.configure(keys={"sk-sdk-limited": {"limit": 1, "window": 30}})
    oa = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="sk-sdk-limited", max_retries=0)
    oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "1"}])
    with pytest.raises(openai.RateLimitError) as caught:
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "2"}])
    assert int(caught.value.response.headers["retry-after"]) >= 29


def exchange(fake: FakeProvider, raw: bytes) -> bytes:
    """Send raw bytes on a new connection; everything the server sends until it closes."""
    host, port = fake.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(raw)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET  /health HTTP/1.1\r\n\r\n", b"400"),
        (b"GET /health HTTP/1.1 extra\r\n\r\n", b"400"),
        (b"GET /health HTTP/9\r\n\r\n", b"400"),
        (b"GET /health HTTP/2.0\r\n\r\n", b"505"),
        (b"GET /health HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
        (b"GET /health HTTP/1.1\r\nhost : x\r\n\r\n", b"400"),
        (b"GET /health HTTP/1.1\r\nx-a: 1\r\n folded\r\n\r\n", b"400"),
        (b"POST /v1/messages HTTP/1.1\r\ncontent-length: 1x\r\n\r\n", b"400"),
        (b"POST /v1/messages HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}", b"400"),
        (b"POST /v1/messages HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", b"411"),
        (b"GET /health HTTP/1.1\r\nx-long: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    ],
)
def test_a_malformed_request_gets_an_error_and_the_server_stays_up(
    fake: FakeProvider, raw: bytes, status: bytes
) -> None:
    answer = exchange(fake, raw)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"\r\nconnection: close\r\n" in answer
    assert httpx.get(f"{fake.url}/health").json() == {"status": "ok"}


def test_the_control_endpoints_and_errors_keep_their_shapes(fake: FakeProvider) -> None:
    url = fake.url
    assert httpx.get(f"{url}/nope").status_code == 404
    assert httpx.post(f"{url}/v1/nope", json={}).status_code == 404
    assert httpx.post(f"{url}/v1/chat/completions", content=b"{nope", headers=bearer("k")).status_code == 400
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 401
    assert httpx.post(f"{url}/v1/chat/completions", json={}, headers=bearer("k")).status_code == 400
    azure = f"{url}/openai/deployments/d/chat/completions"
    assert httpx.post(azure, json=CHAT, headers={"api-key": "k"}).status_code == 404
    assert (
        httpx.post(azure, params={"api-version": "1"}, json=CHAT, headers={"api-key": "k"}).status_code == 200
    )
    fake.configure(keys={"sk-broke": {"quota_exhausted": True}})
    r = httpx.post(f"{url}/v1/messages", json=CHAT, headers={"x-api-key": "sk-broke"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "insufficient_quota"
    fake.configure(error_rate=1.0)
    r = httpx.post(f"{url}/v1/messages", json=CHAT, headers={"x-api-key": "sk-err"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "api_error"
    assert "anthropic-ratelimit-requests-remaining" not in r.headers
    assert fake.stats()["total"]["server_errors"] == 1
    httpx.post(f"{url}/_fake/reset", json={})
    assert fake.stats()["keys"] == {} and fake.stats()["config"]["keys"] == {}


def test_shutdown_returns_with_requests_still_in_flight() -> None:
    server = fake_provider.serve("127.0.0.1", 0, fake_provider.Settings(latency_ms=30_000, jitter_ms=0))
    url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    errors: list[Any] = []

    def slow() -> None:
        try:
            httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=bearer("k"), timeout=10)
        except httpx.HTTPError as e:
            errors.append(e)

    caller = threading.Thread(target=slow)
    caller.start()
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/_fake/stats").json()["keys"].get("k", {}).get("in_flight") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    server.shutdown()
    thread.join(5)
    caller.join(5)
    server.server_close()
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert len(errors) == 1  # the connection closed without an answer
