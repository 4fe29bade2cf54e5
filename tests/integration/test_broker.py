from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pika
import pytest
from ai_rate_limiter.adapters.rabbitmq import BULK_THRESHOLD, STALE_S, Broker, connection_parameters
from ai_rate_limiter.bootstrap import Container
from ai_rate_limiter.errors import NotFound

from tests.tcp_proxy import TcpProxy

DECLARED: list[str] = []  # queues a test made itself, with no row: deleted after it


@pytest.fixture(autouse=True)
def delete_declared(container: Container) -> Iterator[None]:
    yield
    while DECLARED:
        container.broker.delete(container.names("default", DECLARED.pop()), shards=2)


def declare(c: Container) -> str:
    queue_id = fresh_id()
    c.broker.declare(c.names("default", queue_id))
    return queue_id


def fresh_id() -> str:
    """A queue id for broker queues of this test's own, deleted after it (each quorum queue
    left behind is one more for the broker to recover on every restart)."""
    DECLARED.append(f"b-{uuid.uuid4().hex[:8]}")
    return DECLARED[-1]


def channel(c: Container) -> tuple[pika.BlockingConnection, object]:
    conn = pika.BlockingConnection(connection_parameters(c.settings.rabbitmq_url))
    return conn, conn.channel()


def test_queues_are_durable_quorum_queues_with_a_dead_letter_queue(container: Container) -> None:
    names = container.names("default", declare(container))
    conn, ch = channel(container)
    try:
        ch.queue_declare(names.main, passive=True)  # type: ignore[attr-defined]
        ch.queue_declare(names.dead_letter, passive=True)  # type: ignore[attr-defined]
        # Redeclaring as a classic queue is refused: it really is a quorum queue, and so are
        # the delay queues.
        for name in (names.main, names.delay_for(30)):
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
                ch.queue_declare(name, durable=True)  # type: ignore[attr-defined]
            assert err.value.reply_code == 406
            ch = conn.channel()
    finally:
        conn.close()
    container.broker.delete(names)


def test_published_messages_are_persistent_and_confirmed(container: Container) -> None:
    names = container.names("default", declare(container))
    container.broker.publish(names.main, [b'{"n": 1}', b'{"n": 2}'])
    conn, ch = channel(container)
    try:
        _method, props, body = ch.basic_get(names.main, auto_ack=True)  # type: ignore[attr-defined]
        assert body == b'{"n": 1}' and props.delivery_mode == 2
    finally:
        conn.close()


def test_a_bulk_publish_arrives_whole_and_in_order(container: Container) -> None:
    """Past BULK_THRESHOLD the frames are marshalled by hand: bodies of different lengths, an
    empty one and ones larger than a frame must arrive intact, persistent and in order."""
    names = container.names("default", declare(container))
    large = b"x" * 300_000  # past the negotiated frame_max (128 KiB)
    bodies = [large, *(b'{"n": %d}' % i for i in range(5000)), large]  # several write chunks
    bodies[7:7] = [large, b""]
    container.broker.publish(names.main, bodies)
    conn, ch = channel(container)
    try:
        got = []
        for _ in bodies:
            _method, props, body = ch.basic_get(names.main, auto_ack=True)  # type: ignore[attr-defined]
            assert props.delivery_mode == 2
            got.append(body)
        assert got == bodies
        assert ch.basic_get(names.main, auto_ack=True)[0] is None  # type: ignore[attr-defined]
    finally:
        conn.close()
    container.broker.delete(names)


@pytest.mark.parametrize("n", [1, BULK_THRESHOLD + 1])
def test_publishing_to_a_missing_queue_is_not_silently_dropped(container: Container, n: int) -> None:
    with pytest.raises(NotFound):
        container.broker.publish(f"airltest.missing.{uuid.uuid4().hex}", [b"{}"] * n)
    container.broker.ping()  # the shared channel recovered


def test_a_long_delay_does_not_hold_back_a_short_one(container: Container) -> None:
    names = container.names("default", declare(container))
    container.broker.publish_delayed(names, b'{"much": "later"}', 600)
    container.broker.publish_delayed(names, b'{"soon": true}', 0.5)
    assert container.broker.ready(names.delay_for(600)) == 1
    conn, ch = channel(container)
    try:
        deadline, body = time.monotonic() + 5, None
        while body is None and time.monotonic() < deadline:
            body = ch.basic_get(names.main, auto_ack=True)[2]  # type: ignore[attr-defined]
            time.sleep(0.05)
        assert body == b'{"soon": true}'  # back within its second, not after the 600 s one
    finally:
        conn.close()


def test_delays_round_up_to_a_delay_queue() -> None:
    from ai_rate_limiter.domain.names import broker_names

    names = broker_names("airl", "default", "q")
    assert names.delay_for(0.2) == names.delay_for(1) == "airl.default.q.later.1s"
    assert names.delay_for(1.5) == "airl.default.q.later.5s"
    assert names.delay_for(931) == "airl.default.q.later.1800s"
    assert names.delay_for(99_999) == "airl.default.q.later.1800s"  # the longest, then again


def test_delayed_messages_come_back_to_the_main_queue(container: Container) -> None:
    names = container.names("default", declare(container))
    container.broker.publish_delayed(names, b'{"later": true}', 0.3)
    conn, ch = channel(container)
    try:
        assert ch.basic_get(names.main, auto_ack=True)[0] is None  # type: ignore[attr-defined]
        deadline = time.monotonic() + 5
        body = None
        while body is None and time.monotonic() < deadline:
            body = ch.basic_get(names.main, auto_ack=True)[2]  # type: ignore[attr-defined]
            time.sleep(0.05)
        assert body == b'{"later": true}'
    finally:
        conn.close()


def test_deleting_removes_every_queue_of_it(container: Container) -> None:
    names = container.names("default", declare(container))
    container.broker.delete(names)
    for name in (names.main, *(n for _, n in names.delays()), names.dead_letter):
        conn, ch = channel(container)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            ch.queue_declare(name, passive=True)  # type: ignore[attr-defined]
        conn.close()


def wait_ready(c: Container, queue: str, n: int, within_s: float = 5.0) -> None:
    """The broker counts returned messages as ready a moment after they come back."""
    end = time.monotonic() + within_s
    while c.broker.ready(queue) != n and time.monotonic() < end:
        time.sleep(0.05)
    assert c.broker.ready(queue) == n


def take(reader: object, wanted: int, n: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    while len(got) < n:
        one = reader.get(wanted, wait_s=2.0)  # type: ignore[attr-defined]
        assert one is not None, f"only {len(got)} of {n} came"
        got.append(one)
    return got


def test_a_reader_holds_no_more_than_could_start(container: Container) -> None:
    """Asked for a message when 5 could start, a reader holds at most those 5: the rest stay
    ready in the broker, for any worker."""
    names = container.names("default", declare(container))
    container.broker.publish(names.main, [b'{"n": %d}' % i for i in range(30)])
    reader = container.reader([names.main])
    try:
        got = take(reader, 5, 5)
        assert [body for _, body in got] == [b'{"n": %d}' % i for i in range(5)]
        for _ in range(5):  # none more comes while those five are out on calls
            reader.pump()
            time.sleep(0.02)
        assert container.broker.ready(names.main) == 25 and not reader.ready
        for tag, _ in got:
            reader.ack(tag)
        # The first of the five was asked for; the other four came from a consumer given four.
        # Each of their acks lets one more through, with no request for it.
        for _ in range(50):
            reader.pump()
            if len(reader.ready) == 4:
                break
            time.sleep(0.02)
        assert len(reader.ready) == 4 and container.broker.ready(names.main) == 21
    finally:
        reader.close()
    wait_ready(container, names.main, 25)  # the four unacked went back when it closed
    container.broker.delete(names)


def test_a_reader_takes_more_than_its_window_while_the_first_are_out_on_calls(container: Container) -> None:
    """Messages count against a consumer's prefetch until they are acked, for their whole call:
    a reader whose window is all out, asked for more, gets a fresh window instead of waiting."""
    names = container.names("default", declare(container))
    container.broker.publish(names.main, [b'{"n": %d}' % i for i in range(60)])
    reader = container.reader([names.main])
    try:
        got = take(reader, 4, 4)
        got += take(reader, 4, 4)  # none of the first four acked
        got += take(reader, 12, 12)
        assert [body for _, body in got] == [b'{"n": %d}' % i for i in range(20)]
        for tag, _ in got:
            reader.ack(tag)
    finally:
        reader.close()
    wait_ready(container, names.main, 60 - 20 - reader.unacked)
    container.broker.delete(names)


def test_a_reader_asks_its_own_shard_first_then_the_others(container: Container) -> None:
    names = container.names("default", fresh_id())
    container.broker.declare(names, shards=2)
    own, other = reversed(names.shards(2))
    container.broker.publish(other, [b'{"n": 0}'])
    container.broker.publish(own, [b'{"n": 1}', b'{"n": 2}'])
    reader = container.reader([own, other])
    try:
        bodies = [body for _, body in take(reader, 1, 3)]
        assert bodies == [b'{"n": 1}', b'{"n": 2}', b'{"n": 0}']
        assert reader.get(1, wait_s=0.2) is None
    finally:
        reader.close()
    container.broker.delete(names, shards=2)


def test_a_reader_says_when_its_queue_was_deleted(container: Container) -> None:
    names = container.names("default", declare(container))
    container.broker.publish(names.main, [b'{"n": %d}' % i for i in range(3)])
    reader = container.reader([names.main])
    try:
        take(reader, 3, 1)
        container.broker.delete(names)
        with pytest.raises(NotFound):
            for _ in range(20):
                reader.get(3, wait_s=0.1)
    finally:
        reader.close()


def test_a_publish_after_a_long_pause_opens_a_fresh_connection(
    container: Container, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A frozen execution environment thaws with its broker connection still looking open, and
    dead: a publish on it would wait for a confirm that never comes. After STALE_S unused, the
    broker connects afresh first, and the same message goes out on the new connection."""
    names = container.names("default", declare(container))
    proxy = TcpProxy(5672)
    url = container.settings.rabbitmq_url.replace("127.0.0.1:5672", f"127.0.0.1:{proxy.port}")
    assert url != container.settings.rabbitmq_url
    broker = Broker(url)
    try:
        broker.publish(names.main, [b'{"n": 1}'])
        proxy.freeze()  # the old connection: open, and nothing gets through
        monkeypatch.setattr(broker, "_used_at", time.monotonic() - STALE_S - 1)
        started = time.monotonic()
        broker.publish(names.main, [b'{"n": 2}'])
        assert time.monotonic() - started < 5
        assert container.broker.ready(names.main) == 2
        # The old connection is dropped without a word: nothing is logged as an error.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        broker.close()
        proxy.close()
        container.broker.delete(names)
