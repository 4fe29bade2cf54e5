"""What the API accepts as a body before any schema: JSON, not too deep, no NUL characters."""

from __future__ import annotations

import json

import pytest
from ai_rate_limiter.domain.schemas import MAX_DEPTH, load_json
from ai_rate_limiter.errors import BadRequest, ValidationFailed


def nested(depth: int) -> bytes:
    return ("[" * (depth - 1) + "{}" + "]" * (depth - 1)).encode()


def test_nesting_up_to_the_limit_is_fine_and_deeper_is_400() -> None:
    assert load_json(nested(MAX_DEPTH)) is not None
    with pytest.raises(BadRequest, match="nested too deeply"):
        load_json(nested(MAX_DEPTH + 1))
    with pytest.raises(BadRequest, match="nested too deeply"):  # past the decoder's own recursion
        load_json(nested(200_000))


@pytest.mark.parametrize(
    ("body", "field", "pointer"),
    [
        ({"queue_id": "q", "prompt": "a\u0000b"}, "prompt", "/prompt"),
        (
            {"queue_id": "q", "messages": [{"prompt": "ok"}, {"prompt": "\u0000"}]},
            "messages.1.prompt",
            "/messages/1/prompt",
        ),
        (
            {"queue_id": "q", "prompt": "x", "metadata": {"a/b~\u0000": "v"}},
            "metadata.a/b~\u0000",
            "/metadata/a~1b~0\u0000",
        ),
        ("\u0000", "(body)", ""),
    ],
)
def test_a_nul_character_anywhere_is_422_naming_the_field(body: object, field: str, pointer: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        load_json(json.dumps(body).encode())
    assert err.value.extra["errors"] == [
        {
            "field": field,
            "pointer": pointer,
            "message": "contains a NUL character (\\u0000), which cannot be stored",
        }
    ]


def test_bad_json_is_400() -> None:
    for raw in (b"{nope", b"\xff\xfe", b'{"a": "\x00"}'):  # a raw control character is not JSON
        with pytest.raises(BadRequest, match="not valid JSON"):
            load_json(raw)


def test_only_utf8_is_json_here() -> None:
    """json.loads would decode UTF-16 and UTF-32 bytes too, where a NUL is not spelled \\u0000."""
    body = json.dumps({"queue_id": "q", "prompt": "a\u0000"})
    for encoding in ("utf-16", "utf-32"):
        with pytest.raises(BadRequest, match="not valid JSON"):
            load_json(body.encode(encoding))


def test_a_wide_body_is_walked_without_copying_it() -> None:
    """The walk holds one iterator per level: a deep, wide body is checked in one pass."""
    wide = "[" * (MAX_DEPTH - 1) + ",".join(["0"] * 200_000) + "]" * (MAX_DEPTH - 1)
    assert load_json(wide.encode()) is not None
