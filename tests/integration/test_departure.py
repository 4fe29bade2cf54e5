"""A request keeps to its departure at the last step before its bytes go out: after it has a
connection, not before (waiting for a pooled connection or opening one takes time)."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import pytest
from ai_rate_limiter.adapters.egress import Departure, departing, sdk_http_client
from ai_rate_limiter.errors import LateForSlot

from tests.conftest import FakeProvider


def late(s: float) -> LateForSlot:
    return LateForSlot(f"{s * 1e3:.1f} ms late")


def test_a_request_that_waited_for_a_connection_past_its_time_is_not_sent(fake: FakeProvider) -> None:
    fake.configure(latency_ms=300, jitter_ms=0)
    client = sdk_http_client(10, max_connections=1, allow=urlsplit(fake.url).netloc)
    url = f"{fake.url}/v1/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    headers = {"authorization": "Bearer sk-departure-test"}
    first = threading.Thread(target=lambda: client.post(url, json=body, headers=headers))
    first.start()  # holds the only connection for 300 ms
    time.sleep(0.05)
    departure = Departure(leave_by=time.monotonic() + 0.05, on_late=late)
    departing(departure)
    try:
        with pytest.raises(LateForSlot):
            client.post(url, json=body, headers=headers)  # on time at the hook, late at the wire
    finally:
        departing(None)
        first.join()
    assert departure.sent_at is None
    assert fake.stats()["total"]["requests"] == 1  # the late one never reached the provider
    # On time, it is sent and says when it left.
    departure = Departure(leave_by=time.monotonic() + 1.0, on_late=late)
    departing(departure)
    try:
        assert client.post(url, json=body, headers=headers).status_code == 200
    finally:
        departing(None)
    assert departure.sent_at is not None and departure.sent_at <= departure.leave_by
    # And when its last byte was written, which is what the guard is sized from.
    assert departure.written_at is not None and departure.sent_at <= departure.written_at
    assert departure.left_at == departure.written_at
    client.close()


def test_a_request_is_written_at_once_when_it_reads_and_not_at_all_when_late() -> None:
    """Headers and body go out in one write, checked just before it: nothing a descheduled
    thread does between them can make a request reach the provider after its time."""
    import socket

    import httpcore2
    from ai_rate_limiter.adapters import egress

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    backend = egress._pinned_backend(httpcore2)(egress.allowlist(f"127.0.0.1:{port}"))
    stream = backend.connect_tcp("127.0.0.1", port, timeout=5)
    peer, _ = server.accept()
    peer.settimeout(0.2)
    stream.write(b"POST / HTTP/1.1\r\n\r\n")
    stream.write(b"body")
    with pytest.raises(TimeoutError):
        peer.recv(100)  # nothing has left yet
    peer.sendall(b"answer")
    assert stream.read(100, timeout=5) == b"answer"
    assert peer.recv(100) == b"POST / HTTP/1.1\r\n\r\nbody"  # one piece, once the answer is read

    departure = Departure(leave_by=time.monotonic() + 0.05, on_late=late)
    departing(departure)
    try:
        stream.write(b"late")
        time.sleep(0.1)  # past its time with all its bytes ready
        with pytest.raises(LateForSlot):
            stream.read(100, timeout=5)
    finally:
        departing(None)
    assert departure.sent_at is None
    with pytest.raises(TimeoutError):
        peer.recv(100)  # it never left
    stream.close()
    peer.close()
    server.close()


def test_a_request_late_at_the_wire_is_sent_once_it_is_retimed(fake: FakeProvider) -> None:
    """Late with its connection and bytes ready, a request is offered to `retime` first: moved
    to a fresh time it goes at once, on the same connection; refused, it is not sent."""
    client = sdk_http_client(10, max_connections=1, allow=urlsplit(fake.url).netloc)
    url = f"{fake.url}/v1/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    headers = {"authorization": "Bearer sk-retime-test"}
    asked: list[float] = []

    class Retimed(Departure):
        def retime(self, late_s: float) -> bool:
            asked.append(late_s)
            self.leave_by = time.monotonic() + 1.0
            return True

    departure: Departure = Retimed(leave_by=time.monotonic() - 0.01, on_late=late)
    departing(departure)
    try:
        assert client.post(url, json=body, headers=headers).status_code == 200
    finally:
        departing(None)
    assert len(asked) == 1 and asked[0] >= 0.01  # retimed once, at the first check
    assert departure.sent_at is not None and departure.sent_at <= departure.leave_by
    assert fake.stats()["total"]["requests"] == 1

    departure = Departure(leave_by=time.monotonic() - 0.01, on_late=late)  # gives up
    departing(departure)
    try:
        with pytest.raises(LateForSlot):
            client.post(url, json=body, headers=headers)
    finally:
        departing(None)
    assert departure.sent_at is None and fake.stats()["total"]["requests"] == 1
    client.close()
