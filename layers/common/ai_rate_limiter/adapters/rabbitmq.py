"""RabbitMQ: durable quorum queues with a dead-letter queue, confirmed persistent publishes."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from ..domain.names import BrokerNames
from ..errors import DependencyUnavailable, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")
BULK_THRESHOLD = 20  # more messages than this go out with pipelined confirms
WRITE_CHUNK = 256 * 1024  # bytes of marshalled frames per write in a bulk publish
DELIVERY_LIMIT = 20  # redeliveries of one message before it is dead-lettered
DEAD_KEPT = 100_000  # copies a dead-letter queue keeps (the oldest go first; the rows stay)
DEAD_ARGUMENTS = {"x-queue-type": "quorum", "x-max-length": DEAD_KEPT, "x-overflow": "drop-head"}
STALE_S = 30.0  # a publishing connection unused this long is opened afresh before use
PERSISTENT = pika.BasicProperties(delivery_mode=2, content_type="application/json")
RECOVERABLE: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)


def delay_arguments(names: BrokerNames, seconds: int) -> dict[str, Any]:
    """A quorum queue whose messages go back to the main queue after `seconds`: dead-lettered
    at least once (the broker keeps a message until the main queue has it), which takes
    refusing publishes when the queue is full rather than dropping its oldest."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": seconds * 1000,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": names.main,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/")) or "/"


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
        self._declared: set[str] = set()  # delay queues known to exist
        self._used_at = 0.0

    def _channel(self) -> BlockingChannel:
        """The channel, opened afresh if it is closed or has sat unused for STALE_S: a
        connection kept through a frozen execution environment still looks open, and a publish
        on it would wait for a confirm that never comes."""
        stale = time.monotonic() - self._used_at > STALE_S
        if self._chan is None or not self._chan.is_open or stale:
            self._reset(abandon=stale)
            self._conn = pika.BlockingConnection(connection_parameters(self.url))
            self._chan = self._conn.channel()
            self._chan.confirm_delivery()
        self._used_at = time.monotonic()
        return self._chan

    def _reset(self, abandon: bool = False) -> None:
        """Close the connection; `abandon`: its socket is shut down and closed without a word to
        the broker, which a dead connection would never answer (and pika would log the failed
        goodbye as errors); the broker drops its end when that socket closes."""
        conn, self._conn, self._chan = self._conn, None, None
        if conn is None or not conn.is_open:
            return
        sock = getattr(getattr(conn._impl, "_transport", None), "_sock", None)
        if abandon and sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with contextlib.suppress(Exception):  # its own poller, which nothing polls again
                conn._impl.ioloop.close()
            return
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

    def declare(self, names: BrokerNames, shards: int = 1) -> None:
        """The queue's dead-letter queue, its shards (shard 0 is `main`) and its delay queues."""

        def op(ch: BlockingChannel) -> None:
            ch.queue_declare(names.dead_letter, durable=True, arguments={"x-queue-type": "quorum"})
            for shard in names.shards(shards):
                ch.queue_declare(
                    shard,
                    durable=True,
                    arguments={
                        "x-queue-type": "quorum",
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": names.dead_letter,
                        "x-delivery-limit": DELIVERY_LIMIT,
                    },
                )
            for seconds, name in names.delays():
                ch.queue_declare(name, durable=True, arguments=delay_arguments(names, seconds))
            ch.queue_declare(names.dead, durable=True, arguments=DEAD_ARGUMENTS)

        self._run(op)

    def delete(self, names: BrokerNames, shards: int = 1) -> None:
        def op(ch: BlockingChannel) -> None:
            delays = [name for _, name in names.delays()]
            for name in (
                *names.shards(shards),
                *delays,
                *names.legacy_delays(),
                names.dead_letter,
                names.dead,
            ):
                ch.queue_delete(name)
                self._declared.discard(name)

        self._run(op)

    def move(self, source: str, target: str, limit: int) -> int:
        """Move up to `limit` waiting messages from `source` to `target` (each confirmed in
        `target` before it is acked in `source`); how many."""

        def op(ch: BlockingChannel) -> int:
            moved = 0
            while moved < limit:
                method, props, body = ch.basic_get(source, auto_ack=False)
                if method is None:
                    break
                ch.basic_publish("", target, body, props, mandatory=True)
                ch.basic_ack(method.delivery_tag)
                moved += 1
            return moved

        return self._run(op)

    def drain(self, queue: str, settle: Callable[[list[bytes]], None], limit: int) -> int:
        """Take up to `limit` messages from `queue`, hand their bodies to `settle` (which must
        not use the broker), and ack them once it has returned: if it raises, they stay. How
        many were taken."""

        def op(ch: BlockingChannel) -> int:
            tags: list[int] = []
            bodies: list[bytes] = []
            while len(tags) < limit:
                method, _, body = ch.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                tags.append(method.delivery_tag)
                bodies.append(bytes(body))
            if not tags:
                return 0
            try:
                settle(bodies)
            except BaseException:
                ch.basic_nack(tags[-1], multiple=True, requeue=True)
                raise
            ch.basic_ack(tags[-1], multiple=True)
            return len(tags)

        return self._run(op)

    def ready(self, queue: str) -> int:
        """Messages waiting in `queue` (not yet delivered)."""
        return int(self._run(lambda ch: ch.queue_declare(queue, passive=True)).method.message_count)

    def publish(self, queue: str, bodies: Sequence[bytes]) -> None:
        """Publish persistent messages; returns once the broker has confirmed every one."""
        if len(bodies) > BULK_THRESHOLD:
            _ConfirmedBulkPublish(self.url, queue, bodies, timeout_s=30 + len(bodies) / 1000).run()
            return

        def op(ch: BlockingChannel) -> None:
            for body in bodies:
                ch.basic_publish("", queue, body, PERSISTENT, mandatory=True)

        self._run(op)

    def _publish_declared(
        self, queue: str, arguments: dict[str, Any], messages: Sequence[tuple[bytes, pika.BasicProperties]]
    ) -> None:
        """Publish to a queue made on first use (with `arguments`) for a queue of ours made
        before it existed; each confirmed."""

        def op(ch: BlockingChannel) -> None:
            if queue not in self._declared:
                ch.queue_declare(queue, durable=True, arguments=arguments)
                self._declared.add(queue)
            try:
                for body, props in messages:
                    ch.basic_publish("", queue, body, props, mandatory=True)
            except pika.exceptions.UnroutableError:
                self._declared.discard(queue)  # deleted since: declared again next time
                raise

        self._run(op)

    def publish_delayed(self, names: BrokerNames, body: bytes, delay_s: float) -> None:
        """Park a message in the delay queue for `delay_s` (rounded up to one of the delay
        queues); it dead-letters back to the main queue."""
        queue = names.delay_for(delay_s)
        seconds = next(s for s, n in names.delays() if n == queue)
        self._publish_declared(queue, delay_arguments(names, seconds), [(body, PERSISTENT)])

    def publish_dead(self, names: BrokerNames, copies: Sequence[tuple[bytes, str]]) -> None:
        """Copies (body, why) into the queue's dead-letter queue."""
        props = [
            pika.BasicProperties(
                delivery_mode=2, content_type="application/json", headers={"x-why": why[:1000]}
            )
            for _, why in copies
        ]
        self._publish_declared(
            names.dead, DEAD_ARGUMENTS, [(b, p) for (b, _), p in zip(copies, props, strict=True)]
        )

    def prune_dead(self, names: BrokerNames, drop: Callable[[bytes], bool], limit: int) -> int:
        """Go once through up to `limit` copies in the queue's dead-letter queue: those `drop`
        picks are taken off, the others put back at its tail (each confirmed before it is
        acked). How many were taken off."""
        queue = names.dead

        def op(ch: BlockingChannel) -> int:
            dropped = 0
            waiting = ch.queue_declare(queue, durable=True, arguments=DEAD_ARGUMENTS).method.message_count
            for _ in range(min(limit, int(waiting))):
                method, props, body = ch.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                if drop(bytes(body)):
                    dropped += 1
                else:
                    ch.basic_publish("", queue, body, props, mandatory=True)
                ch.basic_ack(method.delivery_tag)
            return dropped

        return self._run(op)

    def ping(self) -> None:
        self._run(lambda ch: None)

    def close(self) -> None:
        with self._lock:
            self._reset()


@dataclass
class _Subscription:
    queue: str
    tag: str
    window: int  # its prefetch: deliveries it holds unacked at most
    out: set[int] = field(default_factory=set)  # its deliveries not acked yet


class QueueReader:
    """Takes a queue's messages while an invocation runs, as many at a time as it can start,
    and acks each once its outcome is stored. Its own shard comes first, then the queue's other
    shards, so that every worker helps with whatever is waiting. Not thread-safe: one thread
    uses it; closing it gives every unacked message back to the broker.

    A `basic.get` per message would be a round trip each, which caps an invocation well under
    a thousand messages a second, and far lower while hundreds of calls share its interpreter.
    So the first message of a shard is asked for (an empty shard answers at once), and the
    rest come from a consumer whose prefetch is what the invocation could start at that moment:
    each ack lets one more through, with no round trip. A message counts against the prefetch
    until it is acked, that is for its whole call; so when the whole window is out on calls and
    more could start, the consumer is replaced by one with a fresh window, sized to what can
    start then (what was delivered stays this reader's to ack). Nothing more than the window
    waits in this process unasked, so on a slow limit (a window of one, or none) the backlog
    stays in the broker."""

    def __init__(self, url: str, queues: Sequence[str]) -> None:
        self.queues = list(queues)
        self.ready: deque[tuple[int, bytes]] = deque()  # delivered, not taken yet
        self.sub: _Subscription | None = None
        self.prefetch = 0  # the channel's, for the next consumer
        self.unacked = 0
        try:
            self.conn = pika.BlockingConnection(connection_parameters(url, heartbeat=30))
            self.ch = self.conn.channel()
            self.ch.add_on_cancel_callback(self._cancelled)
        except RECOVERABLE as exc:
            raise DependencyUnavailable(f"rabbitmq: {exc!r}") from exc

    def get(self, wanted: int = 1, *, wait_s: float = 0.0) -> tuple[int, bytes] | None:
        """The next message, as (delivery tag, body), `wanted` being how many could start now;
        None if every shard is empty (waiting up to `wait_s` for one)."""
        try:
            return self._get(max(wanted, 1), wait_s)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise NotFound("The queue's broker queue does not exist.") from exc
            raise DependencyUnavailable(f"rabbitmq: {exc!r}") from exc
        except RECOVERABLE as exc:
            raise DependencyUnavailable(f"rabbitmq: {exc!r}") from exc

    def _get(self, wanted: int, wait_s: float) -> tuple[int, bytes] | None:
        self.conn.process_data_events(time_limit=0)
        sub = self.sub
        if not self.ready and sub is not None:
            # Replaced only once its whole window is out: a consumer cancelled with credit left
            # would have what is on its way handed back, and each hand-back counts towards the
            # queue's delivery limit.
            if len(sub.out) >= sub.window:
                self._subscribe(sub.queue, wanted)
            if wait_s > 0:
                self._wait(wait_s)
                if not self.ready:  # its shard ran dry: ask the shards again
                    self._unsubscribe()
        if self.ready:
            return self.ready.popleft()
        if self.sub is not None:
            return None
        for queue in self.queues:
            method, _, body = self.ch.basic_get(queue, auto_ack=False)
            if method is not None:
                self.unacked += 1
                if wanted > 1:
                    self._subscribe(queue, wanted - 1)
                return int(method.delivery_tag), bytes(body)
        if wait_s > 0:
            self.conn.process_data_events(time_limit=wait_s)  # heartbeats while it waits
        return None

    def _wait(self, wait_s: float) -> None:
        """Until a delivery comes or `wait_s` has passed (pika may return sooner: after a
        cancel it returns at once)."""
        end = time.monotonic() + wait_s
        while not self.ready and (left := end - time.monotonic()) > 0:
            self.conn.process_data_events(time_limit=left)

    def stop(self) -> None:
        """Take no more: the consumer goes, so that acks from here on let nothing more in."""
        with contextlib.suppress(*RECOVERABLE):
            self._unsubscribe()

    def _subscribe(self, queue: str, window: int) -> None:
        self._unsubscribe()
        if window != self.prefetch:
            self.ch.basic_qos(prefetch_count=window)  # applies to consumers made after it
            self.prefetch = window
        sub = _Subscription(queue, "", window)

        def delivered(_ch: Any, method: Any, _props: Any, body: bytes) -> None:
            tag = int(method.delivery_tag)
            self.ready.append((tag, bytes(body)))
            self.unacked += 1
            sub.out.add(tag)

        sub.tag = self.ch.basic_consume(queue, delivered)
        self.sub = sub

    def _unsubscribe(self) -> None:
        sub, self.sub = self.sub, None
        if sub is not None and sub.tag in self.ch.consumer_tags:
            self.ch.basic_cancel(sub.tag)

    def _cancelled(self, frame: Any) -> None:  # by the broker: its queue was deleted
        if self.sub is not None and self.sub.tag == frame.method.consumer_tag:
            self.sub = None

    def ack(self, tag: int) -> None:
        try:
            self.ch.basic_ack(tag)
            self.unacked -= 1
        except RECOVERABLE as exc:  # the message comes back and finds its outcome stored
            log.warning("ack of a finished message failed: %r", exc)
        if self.sub is not None:
            self.sub.out.discard(tag)

    def pump(self) -> None:
        """Keep the connection's heartbeats going while the thread does other work."""
        with contextlib.suppress(*RECOVERABLE):
            self.conn.process_data_events(time_limit=0)

    def close(self) -> None:
        with contextlib.suppress(*RECOVERABLE):
            if self.conn.is_open:
                self.conn.close()
