"""The egress guard on the real services: URLs refused when they are given (service and API),
names that change their answer refused at connection time (DNS rebinding), connections made to
the address that was checked, and the allowed fake provider still answering.

No test here needs the internet: names resolve through `egress.lookup`, replaced by a table,
and the socket layer under the guard is replaced by one that records where it was asked to
connect and connects to a local server instead."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpcore2
import httpx
import httpx2
import pytest
from ai_rate_limiter.adapters import egress
from ai_rate_limiter.adapters.egress import EgressRefused, http_client, sdk_http_client
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.errors import ValidationFailed
from ai_rate_limiter.services import batches, invocation, messages, providers, queues, sweeper

from tests.conftest import FakeProvider, random_key

from .conftest import Api, make_queue, take_event
from .webhook_receiver import Hook

T = "default"
PUBLIC = "93.184.216.34"
REFUSED = [
    "http://10.0.0.5",
    "http://169.254.169.254/latest/meta-data",
    "http://2852039166/",
    "http://127.0.0.1:15672",
]
# A URL names its host by name or IPv4 address: an IPv6 literal (here 169.254.169.254, mapped)
# is refused for its shape (a name's IPv6 addresses are screened like any other).
IPV6_LITERAL = "http://[::ffff:169.254.169.254]/"


class Resolver:
    """`egress.lookup` from a table: each name answers its list of answers in turn, the last
    one from then on; every lookup is kept."""

    def __init__(self, **answers: list[list[str]]) -> None:
        self.answers = {host.replace("_", "."): list(a) for host, a in answers.items()}
        self.asked: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        answers = self.answers[host]
        return answers.pop(0) if len(answers) > 1 else answers[0]


class PlainAsTLS:
    """A plain connection standing in for a TLS one: `start_tls` notes the name TLS was asked
    to verify and goes on in the clear (the local server speaks plain HTTP)."""

    def __init__(self, stream: Any, names: list[str | None]) -> None:
        self.stream, self.names = stream, names

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: Any = None) -> Any:
        self.names.append(server_hostname)
        return self

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = self.stream.read(max_bytes, timeout)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.stream.write(buffer, timeout)

    def close(self) -> None:
        self.stream.close()

    def get_extra_info(self, info: str) -> Any:
        return self.stream.get_extra_info(info)


class Sockets:
    """Replaces the socket layer under both guards: records each (address, port) it is asked
    to connect to and connects to `target` (a local server) instead; TLS names in `tls`.
    Connections to `target` itself (the tests' own calls to the fake) pass untouched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
        self.connected: list[tuple[str, int]] = []
        self.tls: list[str | None] = []
        parts = urlsplit(target)
        target_at = (str(parts.hostname), int(parts.port or 80))
        for core in (httpcore, httpcore2):
            original = core.SyncBackend.connect_tcp

            def connect_tcp(
                backend: Any, host: str, port: int, *args: Any, _original: Any = original, **kw: Any
            ) -> Any:
                if (host, port) == target_at:
                    return _original(backend, host, port, *args, **kw)
                self.connected.append((host, port))
                return PlainAsTLS(_original(backend, *target_at, *args, **kw), self.tls)

            monkeypatch.setattr(core.SyncBackend, "connect_tcp", connect_tcp)


def run(c: Container, queue_id: str, n: int) -> dict[str, int]:
    return invocation.handle_event(c, take_event(c, queue_id, n), 30)


def provider_body(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider_name": "p",
        "provider_type": "openai",
        "api_key": random_key(),
        "limit": 10,
        "config": {"endpoint": endpoint},
        **extra,
    }


def count_rows(c: Container) -> tuple[int, ...]:
    with c.db.tx() as cur:
        cur.execute("""SELECT (SELECT count(*) FROM messages) AS messages,
                              (SELECT count(*) FROM batches) AS batches,
                              (SELECT count(*) FROM queues) AS queues,
                              (SELECT count(*) FROM providers) AS providers""")
        return tuple(cur.fetchone().values())


def refused_field(call: Any) -> str:
    with pytest.raises(ValidationFailed) as refused:
        call()
    [problem] = refused.value.extra["errors"]
    assert problem["message"].startswith("egress refused: ")
    return str(problem["field"])


# --- at registration ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", REFUSED)
def test_internal_endpoints_are_refused_on_create_and_on_patch(
    container: Container, fake: FakeProvider, url: str
) -> None:
    before = count_rows(container)
    assert refused_field(lambda: providers.create(container, T, provider_body(url))) == "config.endpoint"
    assert count_rows(container) == before
    inline = {"queue_id": "q-refused", "providers": [provider_body(fake.url), provider_body(url)]}
    assert refused_field(lambda: queues.create(container, T, inline)) == "providers.1.config.endpoint"
    assert count_rows(container) == before

    made = providers.create(container, T, provider_body(fake.url))
    pid = made["provider_id"]
    patch = {"config": {"endpoint": url}}
    assert refused_field(lambda: providers.update(container, T, pid, patch)) == "config.endpoint"
    assert providers.get(container, T, pid)["config"]["endpoint"] == fake.url


def post(api: Api, method: str, path: str, body: Any) -> tuple[int, str, Any]:
    r = api.call(method, path, body)
    return r.status_code, r.headers.get("content-type", ""), r.json


def test_the_api_answers_422_problems_naming_the_field(
    api: Api, container: Container, fake: FakeProvider
) -> None:
    before = count_rows(container)
    status, media, problem = post(api, "post", "/provider/create", provider_body("http://10.0.0.5"))
    assert (status, media) == (422, "application/problem+json")
    assert problem["errors"] == [
        {
            "field": "config.endpoint",
            "pointer": "/config/endpoint",
            "message": "egress refused: 10.0.0.5 is a private address",
        }
    ]
    assert problem["detail"] == "config.endpoint: egress refused: 10.0.0.5 is a private address"

    q = make_queue(container, fake.url)
    after_queue = count_rows(container)
    hook = {"queue_id": q, "messages": [{"prompt": "a"}], "webhook_url": "http://169.254.169.254/hook"}
    status, media, problem = post(api, "post", "/message/create", hook)
    assert (status, media) == (422, "application/problem+json")
    assert [e["field"] for e in problem["errors"]] == ["webhook_url"]
    assert "169.254.169.254 is a link-local address" in problem["errors"][0]["message"]
    assert count_rows(container) == after_queue

    pid = post(api, "post", "/provider/create", provider_body(fake.url))[2]["provider_id"]
    patch = {"config": {"endpoint": IPV6_LITERAL}}
    status, media, problem = post(api, "patch", f"/provider/update/{pid}", patch)
    assert (status, media) == (422, "application/problem+json")
    assert problem["errors"][0]["field"] == "config.endpoint"
    assert providers.get(container, T, pid)["config"]["endpoint"] == fake.url
    assert count_rows(container)[3] == before[3] + 2  # the queue's provider and this one


def test_a_webhook_url_to_a_private_address_is_refused_at_submission(
    container: Container, fake: FakeProvider
) -> None:
    q = make_queue(container, fake.url)
    before = count_rows(container)
    for url in ("http://10.0.0.5/hook", "https://192.168.1.10/hook", "http://127.0.0.1:15672/"):
        body = {"queue_id": q, "messages": [{"prompt": "a"}], "webhook_url": url}
        assert refused_field(lambda b=body: messages.submit(container, T, b)) == "webhook_url"
    assert count_rows(container) == before


# --- at connection -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "anthropic", "azure"])
def test_a_name_rebound_to_a_private_address_is_refused_at_connection(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Public when the provider was registered, private when the worker connects: the worker
    fails the message at once with the reason, and nothing reaches the network."""
    resolver = Resolver(rebind_test=[[PUBLIC], ["10.0.0.5"]])
    monkeypatch.setattr(egress, "lookup", resolver)
    sockets = Sockets(monkeypatch, fake.url)  # were the guard skipped, the fake would answer
    key = random_key()
    config = {"endpoint": "https://rebind.test", "deployment": "d", "api_version": "2024-10-21"}
    q = make_queue(container, fake.url, {"provider_type": kind, "api_key": key, "config": config})
    mid = messages.submit(container, T, {"queue_id": q, "prompt": "steal"})["message_id"]
    assert run(container, q, 1) == {"failed": 1}
    m = messages.read(container, T, mid)
    assert (m["status"], m["attempts"]) == ("failed", 1)
    assert m["last_error"] == "egress refused: rebind.test resolves to 10.0.0.5, a private address"
    assert key not in json.dumps(m)
    assert [host for host, _ in resolver.asked] == ["rebind.test", "rebind.test"]
    assert sockets.connected == [] and fake.stats()["total"]["requests"] == 0


def test_the_sdk_client_connects_to_the_checked_address_and_tls_checks_the_name(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = Resolver(provider_test=[[PUBLIC]])
    monkeypatch.setattr(egress, "lookup", resolver)
    sockets = Sockets(monkeypatch, fake.url)
    q = make_queue(container, fake.url, {"config": {"endpoint": "https://provider.test:8443"}})
    mid = messages.submit(container, T, {"queue_id": q, "prompt": "pinned"})["message_id"]
    assert run(container, q, 1) == {"completed": 1}
    assert messages.read(container, T, mid)["response"] == "Echo: pinned"
    # One lookup at registration, one for the connection; the socket got the address, not the
    # name (no second lookup to rebind), and TLS verified the certificate for the name.
    assert resolver.asked == [("provider.test", 8443), ("provider.test", 8443)]
    assert sockets.connected == [(PUBLIC, 8443)]
    assert sockets.tls == ["provider.test"]


def test_the_webhook_client_connects_to_the_checked_address_too(
    fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = Resolver(hooks_test=[["2606:2800:220:1::1", PUBLIC]])
    monkeypatch.setattr(egress, "lookup", resolver)
    sockets = Sockets(monkeypatch, fake.url)
    with http_client(3, 2) as client:
        assert client.get("https://hooks.test/_fake/stats").status_code == 200
    assert resolver.asked == [("hooks.test", 443)]
    assert sockets.connected == [("2606:2800:220:1::1", 443)] and sockets.tls == ["hooks.test"]


def test_a_webhook_rebound_to_a_private_address_is_refused_and_recorded(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = Resolver(hook_test=[[PUBLIC], ["169.254.169.254"]])
    monkeypatch.setattr(egress, "lookup", resolver)
    q = make_queue(container, fake.url)
    body = {"queue_id": q, "messages": [{"prompt": "a"}], "webhook_url": "https://hook.test/in"}
    bid = messages.submit(container, T, body)["batch_id"]
    assert run(container, q, 1) == {"completed": 1}
    sockets = Sockets(monkeypatch, fake.url)
    sweeper.sweep(container)
    hook = batches.progress(container, T, bid)["webhook"]
    assert "egress refused: hook.test resolves to 169.254.169.254, a link-local address" in hook["last_error"]
    assert hook["status"] != "delivered" and sockets.connected == []


def test_both_clients_refuse_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    sockets = Sockets(monkeypatch, "http://127.0.0.1:9")
    with sdk_http_client(3, 2) as sdk, http_client(3, 2) as ours:
        for url in [*REFUSED, "http://93.184.216.34/", "https://0xa9fea9fe/"]:
            with pytest.raises(EgressRefused, match=r"^egress refused: "):
                sdk.post(url)
            with pytest.raises(httpx.ConnectError, match=r"^egress refused: "):
                ours.post(url)
    assert sockets.connected == []


class Redirecting:
    """A local server answering every request with a redirect into the VPC."""

    def __init__(self) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests += 1
                self.send_response(302)
                self.send_header("location", "http://169.254.169.254/latest/meta-data")
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.netloc = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_redirects_are_not_followed() -> None:
    target = Redirecting()
    try:
        with sdk_http_client(3, 2, target.netloc) as sdk, http_client(3, 2, target.netloc) as ours:
            assert sdk.get(f"http://{target.netloc}/").status_code == 302
            assert ours.get(f"http://{target.netloc}/").status_code == 302
        assert target.requests == 2
    finally:
        target.server.shutdown()


def test_the_allowed_fake_provider_answers_and_only_because_it_is_allowed(
    container: Container, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert urlsplit(fake.url).netloc in container.settings.egress_allow.split(",")
    q = make_queue(container, fake.url)
    first = messages.submit(container, T, {"queue_id": q, "prompt": "allowed"})["message_id"]
    assert run(container, q, 1) == {"completed": 1}
    assert messages.read(container, T, first)["response"] == "Echo: allowed"

    # The same queue once the entry is gone: the worker's client refuses the loopback address.
    monkeypatch.setattr(container, "settings", replace(container.settings, egress_allow=""))
    container.__dict__.pop("providers", None)
    second = messages.submit(container, T, {"queue_id": q, "prompt": "refused"})["message_id"]
    assert run(container, q, 1) == {"failed": 1}
    m = messages.read(container, T, second)
    assert m["last_error"] == "egress refused: 127.0.0.1 is a loopback address"
    assert fake.stats()["total"]["requests"] == 1


def test_an_answer_trickled_a_byte_at_a_time_is_cut_at_the_timeout() -> None:
    """Each read gets a byte within the read timeout, so only a deadline on the whole answer
    ends the call: at the timeout after the request left, not 30 s later."""
    hook = Hook("drip")
    port = urlsplit(hook.url).port
    try:
        client = sdk_http_client(1.0, allow=f"127.0.0.1:{port}")
        started = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout):
            client.post(hook.url, content=b"{}", headers={"content-type": "application/json"})
        assert 0.9 <= time.monotonic() - started < 2.0
    finally:
        hook.server.shutdown()
