"""The local event-source mapping: consume RabbitMQ, call the worker with the Amazon MQ event.

Like the AWS event source mapping it keeps prefetch = batch size, gathers up to the batch size
or the batching window, invokes the same `handler(event, context)` in an execution environment
(a process of its own, kept warm), acks the whole batch on success and requeues the whole batch
on an exception. It runs one mapping per shard in use of each queue (its `workers`), follows
queues and their `workers` as they change, and runs the scheduled sweeper.

    python -m local.bridge [--no-sweeper]
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from ai_rate_limiter.adapters.rabbitmq import RECOVERABLE, connection_parameters, vhost_of
from ai_rate_limiter.bootstrap import container
from ai_rate_limiter.config import Settings
from ai_rate_limiter.domain.rmq_event import basic_properties, build_event

from local.environments import Environments, InvocationFailed
from local.functions import load

log = logging.getLogger("bridge")


@dataclass
class LambdaContext:
    """What a handler reads from Lambda's context object."""

    deadline: float
    function_name: str = "worker"
    aws_request_id: str = ""

    def get_remaining_time_in_millis(self) -> int:
        return max(int((self.deadline - time.monotonic()) * 1000), 0)


class QueueConsumer(threading.Thread):
    """One broker queue's event source mapping: prefetch = batch size, a batch gathered up to
    the batch size or the batching window (0: what has already arrived with the first), one
    invocation at a time, in an execution environment of its own; the batch acked when the
    handler returns, requeued whole when it raises."""

    def __init__(self, settings: Settings, queue: str, environments: Environments) -> None:
        super().__init__(name=f"consumer:{queue}", daemon=True)
        self.settings, self.queue, self.environments = settings, queue, environments
        self.stopping = threading.Event()
        self.failures = 0

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.consume()
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    log.info("queue %s is gone; consumer stops", self.queue)
                    return
                log.warning("channel closed on %s: %s", self.queue, exc)
            except RECOVERABLE as exc:
                log.warning("broker connection lost on %s: %r", self.queue, exc)
            self.stopping.wait(1.0)

    def consume(self) -> None:
        s = self.settings
        conn = pika.BlockingConnection(connection_parameters(s.rabbitmq_url, heartbeat=30))
        try:
            ch = conn.channel()
            ch.queue_declare(self.queue, passive=True)
            ch.basic_qos(prefetch_count=s.worker_batch_size)
            pending: list[tuple[Any, Any, bytes]] = []
            tag = ch.basic_consume(self.queue, lambda _ch, m, p, b: pending.append((m, p, b)))
            while not self.stopping.is_set():
                conn.process_data_events(time_limit=0.05)
                if not pending:
                    continue
                opened = time.monotonic()
                while len(pending) < s.worker_batch_size and not self.stopping.is_set():
                    left = s.worker_batching_window_s - (time.monotonic() - opened)
                    if left <= 0:
                        break
                    conn.process_data_events(time_limit=min(left, 0.05))
                conn.process_data_events(time_limit=0)  # what has arrived already
                if self.stopping.is_set():
                    break
                batch, pending[:] = pending[: s.worker_batch_size], pending[s.worker_batch_size :]
                self.invoke(conn, ch, batch)
            if ch.is_open:
                ch.basic_cancel(tag)
            if pending and ch.is_open:
                ch.basic_nack(pending[-1][0].delivery_tag, multiple=True, requeue=True)
        finally:
            if conn.is_open:
                conn.close()

    def invoke(self, conn: pika.BlockingConnection, ch: Any, batch: list[Any]) -> None:
        s = self.settings
        event = build_event(
            self.queue,
            vhost_of(s.rabbitmq_url),
            [
                (
                    body,
                    method.redelivered,
                    basic_properties(
                        props.content_type,
                        props.headers,
                        props.delivery_mode,
                        len(body),
                        message_id=props.message_id,
                        expiration=props.expiration,
                        timestamp=props.timestamp,
                        priority=props.priority,
                        correlation_id=props.correlation_id,
                        reply_to=props.reply_to,
                        type=props.type,
                        app_id=props.app_id,
                        user_id=props.user_id,
                    ),
                )
                for method, props, body in batch
            ],
        )
        last = batch[-1][0].delivery_tag
        try:
            env = self.environments.take()
        except InvocationFailed as exc:
            log.warning("no execution environment for %s: %s", self.queue, exc)
            ch.basic_nack(last, multiple=True, requeue=True)
            return
        try:
            deadline = time.monotonic() + s.worker_timeout_s
            env.invoke(event, deadline, str(uuid.uuid4()), lambda: conn.process_data_events(time_limit=0))
        except InvocationFailed as exc:
            self.failures += 1
            log.error(
                "handler failed on %s (%d messages), requeueing the batch: %s", self.queue, len(batch), exc
            )
            ch.basic_nack(last, multiple=True, requeue=True)
            self.stopping.wait(min(2.0**self.failures, 30.0))
            return
        finally:
            self.environments.give_back(env)
        ch.basic_ack(last, multiple=True)
        self.failures = 0


class Bridge:
    def __init__(self, settings: Settings, sweeper: bool = True) -> None:
        self.settings = settings
        self.sweeper = sweeper
        self.environments = Environments()
        self.consumers: dict[str, QueueConsumer] = {}
        self.stopping = threading.Event()

    def sync(self) -> None:
        """One consumer (event source mapping) per shard in use of every queue: `workers`."""
        c = container()
        wanted = {
            shard
            for q in c.store.queue_workers()
            for shard in c.names(q["tenant_id"], q["queue_id"]).shards(q["workers"])
        }
        for name in list(self.consumers):
            consumer = self.consumers[name]
            if not consumer.is_alive():
                del self.consumers[name]
            elif name not in wanted:
                consumer.stop()  # kept until its invocation has returned: one at a time per mapping
            elif consumer.stopping.is_set():
                consumer.stopping.clear()  # wanted again before it had stopped: it goes on
        for name in sorted(wanted - set(self.consumers)):
            consumer = QueueConsumer(self.settings, name, self.environments)
            self.consumers[name] = consumer
            consumer.start()
            log.info("consuming %s", name)
        self.environments.reap()

    def sweep_forever(self) -> None:
        handler = load("sweeper", "sweeper").handler
        while not self.stopping.wait(self.settings.sweeper_interval_s):
            try:
                handler(
                    {"source": "aws.events", "detail-type": "Scheduled Event"},
                    LambdaContext(time.monotonic() + 60, "sweeper"),
                )
            except Exception:
                log.exception("sweeper run failed")

    def run(self) -> None:
        if self.sweeper:
            threading.Thread(target=self.sweep_forever, name="sweeper", daemon=True).start()
        while not self.stopping.is_set():
            try:
                self.sync()
            except Exception as exc:
                log.warning("cannot list queues: %s", exc)
            self.stopping.wait(self.settings.queue_poll_s)
        for consumer in self.consumers.values():
            consumer.stop()
        self.environments.close()
        for consumer in self.consumers.values():
            consumer.join(timeout=2)


def main() -> None:
    parser = argparse.ArgumentParser(description="local Amazon MQ event-source bridge")
    parser.add_argument("--no-sweeper", action="store_true")
    args = parser.parse_args()
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s bridge %(levelname)s %(message)s")
    logging.getLogger("pika").setLevel(logging.ERROR)
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):  # their debug lines carry headers
        logging.getLogger(name).setLevel(logging.WARNING)
    bridge = Bridge(settings, sweeper=not args.no_sweeper)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: bridge.stopping.set())
    print(
        f"bridge: batch size {settings.worker_batch_size}, window {settings.worker_batching_window_s}s",
        flush=True,
    )
    bridge.run()


if __name__ == "__main__":
    main()
