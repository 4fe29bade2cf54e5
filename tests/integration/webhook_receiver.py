"""A webhook receiver on loopback with a script of answers, for the webhook tests."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from ai_rate_limiter.bootstrap import Container


class Hook:
    """A webhook receiver on loopback that keeps each request's headers and raw body and answers
    the n-th delivery as `script[n]` says (the last step repeats): a status code; "drip" (the
    start of an answer, then a byte every 50 ms for 30 s, never finished); ("slow", s): 204 after
    s seconds. It counts the deliveries it holds at once and how long it held each."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.held_s: list[float] = []
        self.active = self.most_active = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                start = time.monotonic()
                body = self.rfile.read(int(self.headers["content-length"]))
                with outer.lock:
                    outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    step = outer.script[min(len(outer.received), len(outer.script)) - 1]
                    outer.active += 1
                    outer.most_active = max(outer.most_active, outer.active)
                try:
                    outer.answer(self, step)
                finally:
                    with outer.lock:
                        outer.active -= 1
                        outer.held_s.append(time.monotonic() - start)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(h: BaseHTTPRequestHandler, step: Any) -> None:
        if step == "drip":
            try:
                h.wfile.write(b"HTTP/1.1 200 OK\r\nx-drip: ")
                for _ in range(600):
                    time.sleep(0.05)
                    h.wfile.write(b".")
            except OSError:  # the sender hung up
                pass
            h.close_connection = True
            return
        if isinstance(step, tuple):
            time.sleep(step[1])
            step = 204
        h.send_response(step)
        h.send_header("content-length", "0")
        h.end_headers()

    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _ in self.received]


def reachable(c: Container, url: str) -> None:
    """Let the container's webhook client reach a loopback receiver: an `EGRESS_ALLOW` entry
    for it, where the egress guard is there to pass."""
    allow = getattr(c.settings, "egress_allow", None)
    entry = urlsplit(url).netloc
    if allow is not None and entry not in allow.split(","):
        c.settings = replace(c.settings, egress_allow=",".join(filter(None, (allow, entry))))
        c.__dict__.pop("webhooks", None)  # the client is made again, with the entry
