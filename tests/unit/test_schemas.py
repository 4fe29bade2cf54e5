from __future__ import annotations

import re

import pytest
from ai_rate_limiter.domain.schemas import (
    METADATA_BYTES,
    URL_PATTERN,
    BatchIn,
    MessageIn,
    ProviderIn,
    ProviderPatch,
    QueueIn,
    QueuePatch,
    parse,
)
from ai_rate_limiter.errors import BadRequest, ValidationFailed

SEED_PROVIDER = {
    "provider_name": "OpenAI",
    "provider_type": "openai",
    "api_key": "sk-your-api-key",
    "limit": 1000,
    "time_window": 3600,
    "config": {"model": "gpt-4o", "endpoint": "https://api.openai.com"},
}


def test_the_seed_provider_is_accepted() -> None:
    p = parse(ProviderIn, SEED_PROVIDER)
    assert (p.provider_type, p.limit, p.time_window) == ("openai", 1000, 3600)
    assert p.config.model == "gpt-4o"


def test_claude_is_an_alias_for_anthropic() -> None:
    assert parse(ProviderIn, {**SEED_PROVIDER, "provider_type": "Claude"}).provider_type == "anthropic"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"provider_type": "gemini"}, "provider_type"),
        ({"limit": 0}, "limit"),
        ({"limit": "100"}, "limit"),
        ({"time_window": -1}, "time_window"),
        ({"api_key": "has space"}, "api_key"),
        ({"config": {"endpoint": "ftp://x"}}, "config.endpoint"),
        ({"config": {"temperature": 3}}, "config.temperature"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_provider_fields_are_named(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        parse(ProviderIn, {**SEED_PROVIDER, **change})
    assert field in [e["field"] for e in err.value.extra["errors"]]


def test_azure_needs_an_endpoint() -> None:
    with pytest.raises(ValidationFailed, match=r"config\.endpoint"):
        parse(ProviderIn, {**SEED_PROVIDER, "provider_type": "azure", "config": {}})


def test_queue_takes_inline_providers_and_references() -> None:
    q = parse(
        QueueIn,
        {"queue_id": "my-queue-123", "providers": [SEED_PROVIDER, {"provider_id": "abc", "weight": 2}]},
    )
    assert len(q.providers) == 2


@pytest.mark.parametrize("queue_id", ["", "-x", "a.b", "a b", "x" * 101, "ü"])
def test_queue_ids_are_restricted(queue_id: str) -> None:
    with pytest.raises(ValidationFailed, match="queue_id"):
        parse(QueueIn, {"queue_id": queue_id, "providers": [SEED_PROVIDER]})


def test_errors_inside_a_reference_name_the_reference_fields() -> None:
    with pytest.raises(ValidationFailed) as err:
        parse(QueueIn, {"queue_id": "q", "providers": [{"provider_id": "x", "weight": -1}]})
    assert err.value.extra["errors"][0]["field"] == "providers.0.weight"


def test_single_and_batch_messages() -> None:
    m = parse(MessageIn, {"queue_id": "q", "prompt": "Hello", "max_tokens": 5})
    assert m.prompt == "Hello"
    b = parse(
        BatchIn,
        {
            "queue_id": "q",
            "messages": [{"prompt": "a"}, {"prompt": "b"}],
            "webhook_url": "https://example.test/hook",
            "webhook_event": "on_complete",
        },
    )
    assert [x.prompt for x in b.messages] == ["a", "b"]


def test_batch_errors_point_at_the_item() -> None:
    with pytest.raises(ValidationFailed) as err:
        parse(BatchIn, {"queue_id": "q", "messages": [{"prompt": "a"}, {"prompt": ""}]})
    assert err.value.extra["errors"][0]["field"] == "messages.1.prompt"
    assert err.value.extra["errors"][0]["pointer"] == "/messages/1/prompt"  # RFC 6901


def test_metadata_is_held_to_its_size_as_json() -> None:
    fits = {"k": "é" * ((METADATA_BYTES - len('{"k":""}')) // 2)}  # two bytes a character in UTF-8
    assert parse(MessageIn, {"queue_id": "q", "prompt": "x", "metadata": fits}).metadata == fits
    with pytest.raises(ValidationFailed) as err:
        parse(BatchIn, {"queue_id": "q", "messages": [{"prompt": "a", "metadata": {**fits, "m": 1}}]})
    [problem] = err.value.extra["errors"]
    assert problem["pointer"] == "/messages/0/metadata"
    assert f"at most {METADATA_BYTES:,}" in problem["message"]


def test_webhook_must_be_http() -> None:
    with pytest.raises(ValidationFailed, match="webhook_url"):
        parse(BatchIn, {"queue_id": "q", "messages": [{"prompt": "a"}], "webhook_url": "file:///x"})


@pytest.mark.parametrize(
    ("url", "taken"),
    [
        ("https://api.openai.com", True),
        ("https://example.openai.azure.com/openai?x=1", True),
        ("http://127.0.0.1:8600/v1", True),
        ("https://a:65535", True),
        ("https://a:65536", False),
        ("https://a:0", False),
        ("https://user:pw@a", False),  # no credentials in a URL
        ("https://[::1]/", False),  # a host by name or IPv4 address
        ("https://a b", False),
        ("HTTPS://a", False),
        ("https://a.", False),
        ("0000", False),
    ],
)
def test_urls_take_the_shape_the_openapi_pattern_says(url: str, taken: bool) -> None:
    """The pattern OpenAPI publishes for a URL is the one checked: what fits it is taken (the
    egress guard then judges where it points), what does not is refused."""
    assert bool(re.match(URL_PATTERN, url)) is taken
    body = {"queue_id": "q", "messages": [{"prompt": "a"}], "webhook_url": url}
    if taken:
        assert parse(BatchIn, body).webhook_url == url
    else:
        with pytest.raises(ValidationFailed, match="webhook_url"):
            parse(BatchIn, body)


def test_integers_may_be_written_as_integral_numbers() -> None:
    """JSON Schema's `integer` is any number without a fraction."""
    assert parse(ProviderPatch, {"limit": 5.0}).limit == 5
    assert parse(QueuePatch, {"workers": 2.0}).workers == 2
    for bad in (5.5, True, "5", float("inf")):
        with pytest.raises(ValidationFailed, match="limit"):
            parse(ProviderPatch, {"limit": bad})


def test_a_body_that_is_not_an_object_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        parse(MessageIn, ["not", "an", "object"])


def test_patch_fields_are_all_optional_but_still_checked() -> None:
    assert parse(ProviderPatch, {"limit": 5}).limit == 5
    with pytest.raises(ValidationFailed):
        parse(ProviderPatch, {"limit": -5})


@pytest.mark.parametrize("key", ["messages", "max_tokens", "stream", "extra_headers", "timeout"])
def test_extra_cannot_set_what_the_message_or_the_sdk_owns(key: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        parse(MessageIn, {"queue_id": "q", "prompt": "a", "extra": {"top_p": 0.5, key: 1}})
    [problem] = err.value.extra["errors"]
    assert problem["field"] == "extra" and key in problem["message"]
    m = parse(MessageIn, {"queue_id": "q", "prompt": "a", "extra": {"top_p": 0.5, "seed": 7}})
    assert m.extra == {"top_p": 0.5, "seed": 7}
