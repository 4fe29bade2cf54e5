"""A small TCP fault proxy on loopback, to stand between the app and a service (Redis,
RabbitMQ, Postgres) and fail the connections as a network or a frozen process would."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class _Pair:
    client: socket.socket
    upstream: socket.socket
    frozen: bool = False  # nothing passes either way, and nothing says so: a black hole
    closed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.closed.set()
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.close()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream_port`. `freeze()` turns the connections open now
    into black holes (they stay open; new ones work); `cut()` closes every connection and
    refuses new ones until `restore()`."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.pairs: list[_Pair] = []
        self.refusing = False
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="tcp-proxy").start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            pair = _Pair(client, upstream)
            with self.lock:
                self.pairs.append(pair)
            threading.Thread(target=self._pump, args=(pair,), daemon=True).start()

    def _pump(self, pair: _Pair) -> None:
        ends = {pair.client: pair.upstream, pair.upstream: pair.client}
        try:
            while not pair.closed.is_set():
                if pair.frozen:
                    pair.closed.wait(0.05)
                    continue
                readable, _, _ = select.select(list(ends), [], [], 0.05)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    ends[s].sendall(data)
        except OSError:
            return
        finally:
            pair.close()

    def freeze(self) -> None:
        with self.lock:
            for pair in self.pairs:
                pair.frozen = True

    def cut(self) -> None:
        self.refusing = True
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            pair.close()

    def restore(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.stopped.set()
        self.cut()
        with contextlib.suppress(OSError):
            self.listener.close()
