"""EventSourceMappings against botocore's Stubber: every Lambda call with its exact parameters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from ai_rate_limiter.adapters.mappings import Changes, EventSourceMappings, shard_index
from ai_rate_limiter.errors import AppError, DependencyUnavailable
from botocore.exceptions import EndpointConnectionError
from botocore.stub import Stubber

FUNCTION = "airl-WorkerFunction-abc123"
FUNCTION_ARN = f"arn:aws:lambda:us-east-1:123456789012:function:{FUNCTION}"
BROKER = "arn:aws:mq:us-east-1:123456789012:broker:airl:b-1234a5b6-78cd-901e-2fgh-3i45j6k178l9"
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:airl-broker-AbCdEf"
MAIN = "airl.default.my-queue"
LIST = {"FunctionName": FUNCTION, "EventSourceArn": BROKER}


def uuid(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def esm(n: int, queue: str, state: str = "Enabled", batch: int = 10, window: int = 0) -> dict[str, Any]:
    """A mapping as Lambda lists it."""
    return {
        "UUID": uuid(n),
        "EventSourceArn": BROKER,
        "FunctionArn": FUNCTION_ARN,
        "Queues": [queue],
        "State": state,
        "BatchSize": batch,
        "MaximumBatchingWindowInSeconds": window,
        "SourceAccessConfigurations": [
            {"Type": "BASIC_AUTH", "URI": SECRET},
            {"Type": "VIRTUAL_HOST", "URI": "/"},
        ],
    }


def create_params(queue: str, batch: int = 10, window: int = 0) -> dict[str, Any]:
    return {
        "FunctionName": FUNCTION,
        "EventSourceArn": BROKER,
        "Queues": [queue],
        "BatchSize": batch,
        "MaximumBatchingWindowInSeconds": window,
        "Enabled": True,
        "SourceAccessConfigurations": [
            {"Type": "BASIC_AUTH", "URI": SECRET},
            {"Type": "VIRTUAL_HOST", "URI": "/"},
        ],
    }


@pytest.fixture
def client() -> Any:
    return boto3.client("lambda", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")


@pytest.fixture
def stubber(client: Any) -> Iterator[Stubber]:
    with Stubber(client) as stub:
        yield stub


@pytest.fixture
def esms(client: Any) -> EventSourceMappings:
    return EventSourceMappings(client, FUNCTION, BROKER, SECRET)


def listing(stubber: Stubber, *mappings: dict[str, Any]) -> None:
    stubber.add_response("list_event_source_mappings", {"EventSourceMappings": list(mappings)}, LIST)


def created(stubber: Stubber, n: int, queue: str) -> None:
    stubber.add_response("create_event_source_mapping", esm(n, queue, "Creating"), create_params(queue))


def deleted(stubber: Stubber, n: int, queue: str) -> None:
    stubber.add_response("delete_event_source_mapping", esm(n, queue, "Deleting"), {"UUID": uuid(n)})


def test_a_new_queue_gets_one_mapping_per_shard(stubber: Stubber, esms: EventSourceMappings) -> None:
    shards = [MAIN, f"{MAIN}.w1", f"{MAIN}.w2"]
    listing(stubber)
    for n, queue in enumerate(shards, 1):
        created(stubber, n, queue)
    assert esms.sync(MAIN, shards) == Changes(created=tuple(shards))
    stubber.assert_no_pending_responses()


def test_the_configured_batch_size_window_and_vhost_are_what_is_created(client: Any) -> None:
    esms = EventSourceMappings(
        client, FUNCTION, BROKER, SECRET, vhost="tenant-a", batch_size=250, batching_window_s=2.0
    )
    params = create_params(MAIN, batch=250, window=2)
    params["SourceAccessConfigurations"][1]["URI"] = "tenant-a"
    with Stubber(client) as stubber:
        listing(stubber)
        stubber.add_response("create_event_source_mapping", esm(1, MAIN, "Creating", 250, 2), params)
        assert esms.sync(MAIN, [MAIN]).created == (MAIN,)
        stubber.assert_no_pending_responses()


def test_from_four_workers_to_two_deletes_w2_and_w3(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN), esm(2, f"{MAIN}.w1"), esm(3, f"{MAIN}.w2"), esm(4, f"{MAIN}.w3"))
    deleted(stubber, 3, f"{MAIN}.w2")
    deleted(stubber, 4, f"{MAIN}.w3")
    changes = esms.sync(MAIN, [MAIN, f"{MAIN}.w1"])
    assert changes == Changes(deleted=(f"{MAIN}.w2", f"{MAIN}.w3"))
    stubber.assert_no_pending_responses()


def test_from_one_worker_to_three_creates_w1_and_w2(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN))
    created(stubber, 2, f"{MAIN}.w1")
    created(stubber, 3, f"{MAIN}.w2")
    changes = esms.sync(MAIN, [MAIN, f"{MAIN}.w1", f"{MAIN}.w2"])
    assert changes == Changes(created=(f"{MAIN}.w1", f"{MAIN}.w2"))
    stubber.assert_no_pending_responses()


def test_a_drifted_batch_size_or_window_is_updated(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN, batch=100), esm(2, f"{MAIN}.w1"), esm(3, f"{MAIN}.w2", window=1))
    for n, queue in ((1, MAIN), (3, f"{MAIN}.w2")):
        stubber.add_response(
            "update_event_source_mapping",
            esm(n, queue, "Updating"),
            {"UUID": uuid(n), "BatchSize": 10, "MaximumBatchingWindowInSeconds": 0, "Enabled": True},
        )
    changes = esms.sync(MAIN, [MAIN, f"{MAIN}.w1", f"{MAIN}.w2"])
    assert changes == Changes(updated=(MAIN, f"{MAIN}.w2"))
    stubber.assert_no_pending_responses()


def test_a_disabled_mapping_is_enabled_again(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN, "Disabled"))
    stubber.add_response(
        "update_event_source_mapping",
        esm(1, MAIN, "Enabling"),
        {"UUID": uuid(1), "BatchSize": 10, "MaximumBatchingWindowInSeconds": 0, "Enabled": True},
    )
    assert esms.sync(MAIN, [MAIN]) == Changes(updated=(MAIN,))
    stubber.assert_no_pending_responses()


def test_a_second_sync_makes_no_calls_but_the_listing(stubber: Stubber, esms: EventSourceMappings) -> None:
    shards = [MAIN, f"{MAIN}.w1"]
    listing(stubber)
    created(stubber, 1, MAIN)
    created(stubber, 2, f"{MAIN}.w1")
    assert esms.sync(MAIN, shards).created == tuple(shards)
    # Just created, Lambda lists them as Creating: present, with the right settings.
    listing(stubber, esm(1, MAIN, "Creating"), esm(2, f"{MAIN}.w1", "Creating"))
    changes = esms.sync(MAIN, shards)
    assert changes == Changes() and not changes.changed
    listing(stubber, esm(1, MAIN), esm(2, f"{MAIN}.w1", "Updating"))
    assert not esms.sync(MAIN, shards).changed
    stubber.assert_no_pending_responses()


def test_the_listing_follows_next_marker_across_pages(stubber: Stubber, esms: EventSourceMappings) -> None:
    others = [esm(10 + i, f"airl.default.other-{i}") for i in range(3)]
    stubber.add_response(
        "list_event_source_mappings",
        {"EventSourceMappings": [*others, esm(1, MAIN)], "NextMarker": "page-2"},
        LIST,
    )
    stubber.add_response(
        "list_event_source_mappings",
        {"EventSourceMappings": [esm(2, f"{MAIN}.w1"), esm(3, f"{MAIN}.w2")]},
        {**LIST, "Marker": "page-2"},
    )
    deleted(stubber, 3, f"{MAIN}.w2")
    assert esms.sync(MAIN, [MAIN, f"{MAIN}.w1"]) == Changes(deleted=(f"{MAIN}.w2",))
    stubber.assert_no_pending_responses()


def test_list_gives_each_live_shard_its_mapping_in_shard_order(
    stubber: Stubber, esms: EventSourceMappings
) -> None:
    stubber.add_response(
        "list_event_source_mappings",
        {"EventSourceMappings": [esm(3, f"{MAIN}.w10"), esm(9, f"{MAIN}.w3", "Deleting")], "NextMarker": "m"},
        LIST,
    )
    stubber.add_response(
        "list_event_source_mappings",
        {"EventSourceMappings": [esm(2, f"{MAIN}.w2", "Creating"), esm(1, MAIN), esm(8, f"{MAIN}2")]},
        {**LIST, "Marker": "m"},
    )
    found = esms.list(MAIN)
    assert list(found) == [MAIN, f"{MAIN}.w2", f"{MAIN}.w10"]
    assert found[f"{MAIN}.w2"]["UUID"] == uuid(2) and found[f"{MAIN}.w2"]["State"] == "Creating"
    stubber.assert_no_pending_responses()


def test_remove_deletes_every_shard_of_the_queue(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN), esm(2, f"{MAIN}.w1"), esm(3, f"{MAIN}.w2", "Creating"))
    for n, queue in ((1, MAIN), (2, f"{MAIN}.w1"), (3, f"{MAIN}.w2")):
        deleted(stubber, n, queue)
    assert esms.remove(MAIN) == Changes(deleted=(MAIN, f"{MAIN}.w1", f"{MAIN}.w2"))
    stubber.assert_no_pending_responses()


SIMILAR = [
    f"{MAIN}2",
    f"{MAIN}2.w1",
    f"{MAIN}.wx",
    f"{MAIN}.w",
    f"{MAIN}.w1x",
    f"{MAIN}.w1.w2",
    f"{MAIN}.dlq",
    f"{MAIN}.delay",
    f"x{MAIN}",
    "airl.default.my-queue-2",
    "airl.default.my_queue",
]


def test_queues_with_a_similar_name_are_never_touched(stubber: Stubber, esms: EventSourceMappings) -> None:
    others = [esm(100 + i, queue) for i, queue in enumerate(SIMILAR)]
    listing(stubber, *others, esm(1, MAIN))
    created(stubber, 2, f"{MAIN}.w1")
    assert esms.sync(MAIN, [MAIN, f"{MAIN}.w1"]) == Changes(created=(f"{MAIN}.w1",))
    listing(stubber, *others, esm(1, MAIN), esm(2, f"{MAIN}.w1"))
    deleted(stubber, 1, MAIN)
    deleted(stubber, 2, f"{MAIN}.w1")
    assert esms.remove(MAIN) == Changes(deleted=(MAIN, f"{MAIN}.w1"))
    listing(stubber, *others)
    assert esms.list(MAIN) == {}
    stubber.assert_no_pending_responses()
    assert all(shard_index(MAIN, queue) is None for queue in SIMILAR)
    assert [shard_index(MAIN, q) for q in (MAIN, f"{MAIN}.w1", f"{MAIN}.w12")] == [0, 1, 12]


def test_mappings_being_deleted_are_ignored(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN, "Deleting"), esm(2, f"{MAIN}.w1", "Deleting"))
    created(stubber, 3, MAIN)
    assert esms.sync(MAIN, [MAIN]) == Changes(created=(MAIN,))
    listing(stubber, esm(1, MAIN, "Deleting"))
    assert esms.remove(MAIN) == Changes()
    stubber.assert_no_pending_responses()


def test_a_second_mapping_of_one_shard_is_deleted(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN), esm(2, MAIN))
    deleted(stubber, 2, MAIN)
    assert esms.sync(MAIN, [MAIN]) == Changes(deleted=(MAIN,))
    stubber.assert_no_pending_responses()


def test_a_mapping_already_gone_counts_as_deleted(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN))
    stubber.add_client_error(
        "delete_event_source_mapping",
        "ResourceNotFoundException",
        "The resource you requested does not exist.",
        404,
        expected_params={"UUID": uuid(1)},
    )
    assert esms.remove(MAIN) == Changes(deleted=(MAIN,))
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("method", "code", "status"),
    [
        ("list_event_source_mappings", "TooManyRequestsException", 429),
        ("list_event_source_mappings", "ServiceException", 500),
        ("create_event_source_mapping", "TooManyRequestsException", 429),
        ("create_event_source_mapping", "ResourceConflictException", 409),
    ],
)
def test_throttling_and_service_errors_become_dependency_unavailable(
    stubber: Stubber, esms: EventSourceMappings, method: str, code: str, status: int
) -> None:
    if method == "list_event_source_mappings":
        stubber.add_client_error(method, code, "slow down", status, expected_params=LIST)
    else:
        listing(stubber)
        stubber.add_client_error(method, code, "slow down", status, expected_params=create_params(MAIN))
    with pytest.raises(DependencyUnavailable) as raised:
        esms.sync(MAIN, [MAIN])
    assert raised.value.retryable and raised.value.status == 503
    assert code in raised.value.detail and raised.value.extra["code"] == code
    assert raised.value.__cause__ is not None
    stubber.assert_no_pending_responses()


def test_deleting_a_busy_mapping_is_retryable(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber, esm(1, MAIN, batch=5), esm(2, f"{MAIN}.w1"))
    stubber.add_client_error(
        "delete_event_source_mapping",
        "ResourceInUseException",
        "busy",
        400,
        expected_params={"UUID": uuid(2)},
    )
    with pytest.raises(DependencyUnavailable):
        esms.sync(MAIN, [MAIN])
    stubber.assert_no_pending_responses()


def test_a_refused_request_is_a_permanent_error(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber)
    stubber.add_client_error(
        "create_event_source_mapping",
        "AccessDeniedException",
        "not authorized to perform: lambda:CreateEventSourceMapping",
        403,
        expected_params=create_params(MAIN),
    )
    with pytest.raises(AppError) as raised:
        esms.sync(MAIN, [MAIN])
    assert not isinstance(raised.value, DependencyUnavailable) and not raised.value.retryable
    assert "AccessDeniedException" in raised.value.detail
    stubber.assert_no_pending_responses()


def test_an_unreachable_endpoint_becomes_dependency_unavailable(
    client: Any, stubber: Stubber, esms: EventSourceMappings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(**_: Any) -> Any:
        raise EndpointConnectionError(endpoint_url="https://lambda.us-east-1.amazonaws.com")

    monkeypatch.setattr(client, "delete_event_source_mapping", unreachable)
    listing(stubber, esm(1, MAIN))
    with pytest.raises(DependencyUnavailable, match="DeleteEventSourceMapping"):
        esms.remove(MAIN)
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": 10_001},
        {"batch_size": True},
        {"batching_window_s": -1},
        {"batching_window_s": 301},
        {"batching_window_s": 0.5},
        {"vhost": ""},
    ],
)
def test_settings_lambda_would_refuse_are_refused_at_once(client: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EventSourceMappings(client, FUNCTION, BROKER, SECRET, **kwargs)
    with pytest.raises(ValueError):
        EventSourceMappings(client, "", BROKER, SECRET)
    assert EventSourceMappings(client, FUNCTION, BROKER, SECRET, batch_size=10_000, batching_window_s=300)


@pytest.mark.parametrize(
    "shards",
    [[f"{MAIN}2"], [MAIN, f"{MAIN}.dlq"], [f"{MAIN}.wx"], MAIN, [""]],
)
def test_only_shards_of_the_queue_may_be_asked_for(
    stubber: Stubber, esms: EventSourceMappings, shards: Any
) -> None:
    with pytest.raises(ValueError):
        esms.sync(MAIN, shards)
    with pytest.raises(ValueError):
        esms.remove("")
    stubber.assert_no_pending_responses()


def test_a_shard_asked_for_twice_is_mapped_once(stubber: Stubber, esms: EventSourceMappings) -> None:
    listing(stubber)
    created(stubber, 1, MAIN)
    assert esms.sync(MAIN, [MAIN, MAIN]) == Changes(created=(MAIN,))
    stubber.assert_no_pending_responses()
