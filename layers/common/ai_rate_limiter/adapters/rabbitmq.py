"""RabbitMQ: durable quorum queues with a dead-letter queue, confirmed persistent publishes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ..domain.names import BrokerNames
from ..errors import DependencyUnavailable, NotFound

T = TypeVar("T")
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
