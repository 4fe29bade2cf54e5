"""The small asyncio HTTP/1.1 server under the fake provider (stdlib only).

One event loop holds every connection, so thousands can wait on their answers at once. It speaks
what the official SDKs (httpx, HTTP/1.1) and curl send: keep-alive, pipelined requests answered
in order, `content-length` bodies and `expect: 100-continue`. It answers 400 to a malformed
request line or header, 411 to a `transfer-encoding` body, 413 to a body over 32 MiB, 431 to
oversized headers and 505 to a version other than HTTP/1.x, and closes the connection after them.

`Server` has socketserver's shape, so callers can run it in a thread: `server_address`,
`serve_forever()` (blocking), `shutdown()` (from another thread; returns once serve_forever has)
and `server_close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import platform
import re
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

BACKLOG = 4096  # connections the kernel queues before they are accepted (capped by somaxconn)
BUFFER = 64 * 1024  # the stream's buffer limit, and so the longest line
MAX_LINE = 8 * 1024
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY = 32 * 1024 * 1024
SERVER = f"FakeProvider/1.0 Python/{platform.python_version()}"

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
TARGET = re.compile(rb"[\x21-\x7e]+")
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
VERSION = re.compile(rb"HTTP/(\d)\.(\d)")


class BadRequest(Exception):
    """A request we cannot or will not read; the connection closes after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Request:
    method: str
    target: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: dict[str, str]  # names lower-cased; the first of repeated names
    body: bytes
    arrived: float  # time.monotonic() once the headers and the body were read
    keep_alive: bool


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    close: bool = False

    def encode(self, keep_alive: bool, http10: bool) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {reason(self.status)}",
            f"server: {SERVER}",
            f"date: {http_date()}",
            f"content-type: {self.content_type}",
            f"content-length: {len(self.body)}",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        if not keep_alive:
            lines.append("connection: close")
        elif http10:
            lines.append("connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(body).encode(), dict(headers or {}))


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"error": {"message": message, "type": "invalid_request_error"}})


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


async def read_line(reader: asyncio.StreamReader, limit: int = MAX_LINE) -> bytes | None:
    """One line without its CRLF (or bare LF); None at the end of the stream."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise BadRequest(400, "the request ended inside a line") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "a request line or header is too long") from None
    if len(line) > limit:
        raise BadRequest(431, "a request line or header is too long")
    line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    if b"\r" in line:
        raise BadRequest(400, "a bare CR in the request head")
    return line


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """The next request on the connection; None when the client has closed it."""
    line = await read_line(reader)
    for _ in range(4):  # a few empty lines may come before a request (RFC 9112, 2.2)
        if line != b"":
            break
        line = await read_line(reader)
    if not line:
        return None
    parts = line.split(b" ")
    if len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or not TARGET.fullmatch(parts[1]):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if not (target.startswith(b"/") or target.startswith(b"http") or target == b"*"):
        raise BadRequest(400, "malformed request target")
    v = VERSION.fullmatch(version)
    if v is None:
        raise BadRequest(400, "malformed HTTP version")
    if v.group(1) != b"1":
        raise BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are supported")

    headers: dict[str, str] = {}
    lengths: set[bytes] = set()
    size = 0
    while True:
        line = await read_line(reader)
        if line is None:
            raise BadRequest(400, "the request ended inside its headers")
        if line == b"":
            break
        size += len(line)
        if len(headers) >= MAX_HEADERS or size > MAX_HEADER_BYTES:
            raise BadRequest(431, "too many request headers")
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(400, "obsolete line folding in a header")
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not TOKEN.fullmatch(name) or not FIELD_VALUE.fullmatch(value):
            raise BadRequest(400, "malformed header")
        key = name.decode("ascii").lower()
        if key == "content-length":
            lengths.add(value)
        headers.setdefault(key, value.decode("latin-1"))

    http11 = v.group(2) != b"0"
    if "transfer-encoding" in headers:
        raise BadRequest(411, "transfer-encoding is not supported: send a content-length")
    if len(lengths) > 1:
        raise BadRequest(400, "conflicting content-length headers")
    raw = next(iter(lengths), b"0")
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest(400, "malformed content-length")
    length = int(raw)
    if length > MAX_BODY:
        raise BadRequest(413, f"the body is over {MAX_BODY} bytes")
    expect = headers.get("expect", "").lower()
    if expect:
        if expect != "100-continue":
            raise BadRequest(417, f"cannot meet expect: {expect}")
        if http11:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError:
        return None  # the client went away mid-body: nobody to answer
    arrived = time.monotonic()

    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens if http11 else "keep-alive" in tokens
    return Request(
        method.decode("ascii"),
        target.decode("ascii"),
        f"HTTP/1.{v.group(2).decode()}",
        headers,
        body,
        arrived,
        keep_alive,
    )


class Server:
    def __init__(self, address: tuple[str, int], handler: Handler) -> None:
        self.handler = handler
        self.socket = socket.create_server(address, backlog=BACKLOG)
        host, port = self.socket.getsockname()[:2]
        self.server_address: tuple[str, int] = (host, port)
        self._guard = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._idle = threading.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handling = 0  # requests being answered
        self._last_request = -math.inf

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: object) -> None:
        self.server_close()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until shutdown(). poll_interval is socketserver's and unused: shutdown() wakes
        the loop at once."""
        with self._guard:
            if self._stopping:  # shut down before it started
                self._stopping = False
                return
            runner = asyncio.Runner()
            self._loop = runner.get_loop()
            self._stop = asyncio.Event()
            self._idle.clear()
        try:
            with runner:
                runner.run(self._serve())
        finally:
            with self._guard:
                self._loop, self._stopping = None, False
            self._idle.set()

    def shutdown(self) -> None:
        """Stop serve_forever and wait until it has returned; call it from another thread."""
        with self._guard:
            self._stopping = True
            loop, stop = self._loop, self._stop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
            loop.call_soon_threadsafe(stop.set)
        self._idle.wait()

    def requests_seen(self) -> tuple[int, float]:
        """(requests being answered, when the last one arrived on the monotonic clock)."""
        return self._handling, self._last_request

    def server_close(self) -> None:
        self.socket.close()

    async def _serve(self) -> None:
        # A duplicate of the socket, which asyncio closes when it stops: ours stays bound, as
        # socketserver's does, until server_close().
        server = await asyncio.start_server(
            self._connection, sock=self.socket.dup(), backlog=BACKLOG, limit=BUFFER
        )
        try:
            await self._stop.wait()
        finally:
            server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # shutting down; and 3.11's start_server logs a cancelled callback as an error
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader, writer)
            except BadRequest as e:
                writer.write(error_response(e.status, e.message).encode(keep_alive=False, http10=False))
                await writer.drain()
                return
            if request is None:
                return
            self._handling += 1
            self._last_request = time.monotonic()
            try:
                response = await self.handler(request)
            except Exception:
                traceback.print_exc()
                response = error_response(500, "the fake provider failed on this request")
                response.close = True
            finally:
                self._handling -= 1
            keep_alive = request.keep_alive and not response.close
            writer.write(response.encode(keep_alive, http10=request.version == "HTTP/1.0"))
            await writer.drain()
            if not keep_alive:
                return
