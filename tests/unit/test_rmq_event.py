from __future__ import annotations

import json
from pathlib import Path

import pytest
from ai_rate_limiter.domain.rmq_event import basic_properties, build_event, parse_event
from ai_rate_limiter.services.dispatch import message_body, message_id_of

SAMPLE = json.loads((Path(__file__).parents[1] / "events" / "rmq_sample_event.json").read_text())


def test_parses_aws_sample_event() -> None:
    [d] = parse_event(SAMPLE)
    assert (d.queue, d.vhost, d.redelivered) == ("pizzaQueue", "/", False)
    assert json.loads(d.data) == {"timeout": 0, "data": "CZrmf0Gw8Ov4bqLQxD4E"}
    assert d.headers == {"header1": "value1", "header2": "value2", "numberInHeader": 10}


def test_built_events_have_the_aws_shape_and_round_trip() -> None:
    props = basic_properties(
        "application/json", {"tenant": "t1", "n": 3}, 2, 7, timestamp=2021, message_id="m-1"
    )
    event = build_event("airl.default.q", "/", [(b'{"a":1}', True, props)])
    assert set(event) == {"eventSource", "eventSourceArn", "rmqMessagesByQueue"}
    assert event["eventSource"] == "aws:rmq"
    [message] = event["rmqMessagesByQueue"]["airl.default.q::/"]
    assert set(message) == {"basicProperties", "redelivered", "data"}
    assert set(message["basicProperties"]) == set(
        SAMPLE["rmqMessagesByQueue"]["pizzaQueue::/"][0]["basicProperties"]
    )
    assert message["basicProperties"]["headers"]["tenant"] == {"bytes": list(b"t1")}
    assert message["basicProperties"]["timestamp"] == "Jan 1, 1970, 12:33:41 AM"
    [d] = parse_event(event)
    assert (d.data, d.redelivered, d.headers["tenant"], d.headers["n"]) == (b'{"a":1}', True, "t1", 3)


def test_undecodable_data_becomes_empty() -> None:
    event = build_event("q", "/", [(b"x", False, {})])
    event["rmqMessagesByQueue"]["q::/"][0]["data"] = "***"
    assert parse_event(event)[0].data == b""


@pytest.mark.parametrize(
    "body",
    [b'{"message_id": 123}', b"[1]", b'"x"', b'{"message_id": null}', b"\xff", b'{"message_id": [1]}', b"{}"],
)
def test_a_body_that_is_not_a_message_reads_as_none(body: bytes) -> None:
    assert message_id_of(body) is None


def test_a_message_body_reads_back_as_its_id() -> None:
    mid = "6f1c1f7e-3c4b-4b8e-9a51-0d3f7a1c2b3d"
    assert message_id_of(message_body("t", mid)) == mid
