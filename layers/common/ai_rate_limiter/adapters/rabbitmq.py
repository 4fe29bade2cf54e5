"""RabbitMQ: durable quorum queues with a dead-letter queue, confirmed persistent publishes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ..domain.names import BrokerNames
from ..errors import DependencyUnavailable, NotFound

T = TypeVar("T")
BULK_THRESHOLD = 20  # more messages than this go out with pipelined confirms
WRITE_CHUNK = 256 * 1024  # bytes of marshalled frames per write in a bulk publish
DELIVERY_LIMIT = 20  # redeliveries of one message before it is dead-lettered
PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")
RECOVERABLE: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)


def connection_parameters(url: str, heartbeat: int = 60) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 30
    params.connection_attempts = 1
    params.socket_timeout = 5
    return params


class _ConfirmedBulkPublish:
    """Publish many messages on a fresh connection with pipelined publisher confirms: all are
    sent at once and the broker's acks are collected as they come (pika's asynchronous API),
    instead of one round trip per message."""

    def __init__(self, url: str, queue: str, bodies: Sequence[bytes], timeout_s: float) -> None:
        self.url, self.queue, self.bodies, self.timeout_s = url, queue, bodies, timeout_s
        self.unconfirmed: set[int] = set()
        self.lowest = 1
        self.nacked = self.returned = 0
        self.error: str | None = None
        self.done = False

    def run(self) -> None:
        conn = pika.SelectConnection(
            connection_parameters(self.url),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda c, exc: self._fail(c, f"cannot connect: {exc!r}"),
            on_close_callback=lambda c, reason: c.ioloop.stop(),
        )
        self.conn = conn
        conn.ioloop.call_later(self.timeout_s, lambda: self._fail(conn, "timed out waiting for confirms"))
        conn.ioloop.start()
        if self.error or not self.done:
            raise DependencyUnavailable(f"rabbitmq: {self.error or 'connection closed'}")
        if self.returned:
            raise NotFound("The queue's broker queue does not exist.")
        if self.nacked:
            raise DependencyUnavailable(f"rabbitmq refused {self.nacked} message(s)")

    def _fail(self, conn: pika.SelectConnection, why: str) -> None:
        if not self.done and self.error is None:
            self.error = why
        if conn.is_open:
            conn.close()
        elif not conn.is_closing:
            conn.ioloop.stop()

    def _on_channel(self, ch: Any) -> None:
        ch.add_on_close_callback(lambda c, reason: self._fail(self.conn, f"channel closed: {reason}"))
        ch.add_on_return_callback(self._on_return)
        ch.confirm_delivery(self._on_confirm, callback=lambda _: self._publish_all(ch))

    def _publish_all(self, ch: Any) -> None:
        """What `basic_publish` sends for each body (method, header and body frame), marshalled
        here and written in one go: every message shares its method frame, and its header
        frame with every body of the same length, so pika's per-frame work is done once."""
        self.unconfirmed = set(range(1, len(self.bodies) + 1))
        if not self.bodies:
            self._finish()
            return
        n = ch.channel_number
        publish = pika.spec.Basic.Publish(exchange="", routing_key=self.queue, mandatory=True)
        method = pika.frame.Method(n, publish).marshal()
        headers: dict[int, bytes] = {}
        frames: list[bytes] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if frames:  # in pieces of about WRITE_CHUNK: pika copies what one send leaves over
                self.conn._output_marshaled_frames([b"".join(frames)])
                frames.clear()
                size = 0

        for body in self.bodies:
            if not body or len(body) > self.conn._body_max_length:  # no body frame, or several
                flush()
                ch.basic_publish("", self.queue, body, PERSISTENT, mandatory=True)
                continue
            header = headers.get(len(body))
            if header is None:
                header = headers[len(body)] = pika.frame.Header(n, len(body), PERSISTENT).marshal()
            frames += (method, header, pika.frame.Body(n, body).marshal())
            size += len(method) + len(header) + len(body) + 8
            if size >= WRITE_CHUNK:
                flush()
        flush()

    def _on_return(self, *_: Any) -> None:
        self.returned += 1

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if method.multiple:  # every tag up to this one; tags are sequential from 1
            tags = range(self.lowest, method.delivery_tag + 1)
            self.lowest = max(self.lowest, method.delivery_tag + 1)
        else:
            tags = range(method.delivery_tag, method.delivery_tag + 1)
        before = len(self.unconfirmed)
        self.unconfirmed.difference_update(tags)
        if isinstance(method, pika.spec.Basic.Nack):
            self.nacked += before - len(self.unconfirmed)
        if not self.unconfirmed:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        self.conn.close()


class Broker:
    """One lazily opened confirm-mode channel, shared by threads under a lock."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._conn: pika.BlockingConnection | None = None
        self._chan: BlockingChannel | None = None

    def _channel(self) -> BlockingChannel:
        if self._chan is None or not self._chan.is_open:
            self._reset()
            self._conn = pika.BlockingConnection(connection_parameters(self.url))
            self._chan = self._conn.channel()
            self._chan.confirm_delivery()
        return self._chan

    def _reset(self) -> None:
        conn, self._conn, self._chan = self._conn, None, None
        if conn is not None and conn.is_open:
            with contextlib.suppress(*RECOVERABLE):
                conn.close()

    def _run(self, op: Callable[[BlockingChannel], T]) -> T:
        with self._lock:
            for attempt in (1, 2):
                try:
                    return op(self._channel())
                except pika.exceptions.UnroutableError as exc:
                    raise NotFound("The queue's broker queue does not exist.") from exc
                except RECOVERABLE as exc:
                    self._reset()
                    if attempt == 2:
                        raise DependencyUnavailable(f"rabbitmq: {exc!r}") from exc
            raise AssertionError("unreachable")

    def declare(self, names: BrokerNames) -> None:
        def op(ch: BlockingChannel) -> None:
            ch.queue_declare(names.dead_letter, durable=True, arguments={"x-queue-type": "quorum"})
            ch.queue_declare(
                names.main,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": names.dead_letter,
                    "x-delivery-limit": DELIVERY_LIMIT,
                },
            )
            ch.queue_declare(
                names.delay,
                durable=True,
                arguments={
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": names.main,
                },
            )

        self._run(op)

    def delete(self, names: BrokerNames) -> None:
        def op(ch: BlockingChannel) -> None:
            for name in (names.main, names.delay, names.dead_letter):
                ch.queue_delete(name)

        self._run(op)

    def publish(self, queue: str, bodies: Sequence[bytes]) -> None:
        """Publish persistent messages; returns once the broker has confirmed every one."""
        if len(bodies) > BULK_THRESHOLD:
            _ConfirmedBulkPublish(self.url, queue, bodies, timeout_s=30 + len(bodies) / 1000).run()
            return

        def op(ch: BlockingChannel) -> None:
            for body in bodies:
                ch.basic_publish("", queue, body, PERSISTENT, mandatory=True)

        self._run(op)

    def publish_delayed(self, names: BrokerNames, body: bytes, delay_s: float) -> None:
        """Park a message in the delay queue; it dead-letters back to the main queue."""
        props = pika.BasicProperties(
            delivery_mode=2,
            content_type="application/json",
            expiration=str(max(int(delay_s * 1000), 1)),
        )
        self._run(lambda ch: ch.basic_publish("", names.delay, body, props, mandatory=True))

    def ping(self) -> None:
        self._run(lambda ch: None)

    def close(self) -> None:
        with self._lock:
            self._reset()
