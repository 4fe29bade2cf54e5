"""What the API accepts, validated strictly: unknown fields and wrong types are refused."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import BadRequest, ValidationFailed, field_error, invalid
from .models import PROVIDER_ALIASES, ProviderType

M = TypeVar("M", bound=BaseModel)
QUEUE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
Text = Annotated[str, Field(min_length=1, max_length=1_000_000)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
METADATA_BYTES = 16_384  # a message's metadata, as compact UTF-8 JSON


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def integral(*fields: str) -> Any:
    """JSON has one kind of number, and JSON Schema's `integer` is any number without a
    fraction: these integer fields take 3.0 as 3 (and still refuse 3.5 or true)."""
    return field_validator(*fields, mode="before")(
        lambda value: int(value) if isinstance(value, float) and value.is_integer() else value
    )


_PORT = r"(?::(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
# An absolute http(s) URL naming its host (a name or an IPv4 address) and at most a port;
# where the host points is the egress guard's to judge, when the URL is registered.
URL_PATTERN = rf"^https?://[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?{_PORT}(?:[/?#][^\s\x00]*)?$"
_URL = re.compile(URL_PATTERN)
Url = Annotated[str, Field(max_length=2000, json_schema_extra={"pattern": URL_PATTERN, "format": "uri"})]


def check_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not _URL.match(value):
        raise ValueError("must be an absolute http(s) URL: http(s)://host[:port][/path]")
    return value


class ProviderConfig(Strict):
    model_config = ConfigDict(extra="allow", strict=True)
    model: Name | None = None
    endpoint: Url | None = None
    api_version: Name | None = None
    deployment: Name | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)

    _url = field_validator("endpoint")(check_url)
    _int = integral("max_tokens")


def provider_type(value: str) -> str:
    value = value.strip().lower()
    value = PROVIDER_ALIASES.get(value, value)
    if value not in set(ProviderType):
        raise ValueError(f"must be one of {', '.join(ProviderType)} (or claude)")
    return str(value)


def _any_case(words: list[str]) -> str:
    """A JSON Schema pattern for these words in any case, with spaces around them allowed (as
    `provider_type` takes them): `[Oo][Pp]...`, since JSON Schema patterns have no flags."""
    spelled = (
        "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in w) for w in words
    )
    return rf"^\s*(?:{'|'.join(spelled)})\s*$"


PROVIDER_TYPE = Field(json_schema_extra={"pattern": _any_case([*ProviderType, *PROVIDER_ALIASES])})


API_KEY = r"^[\x21-\x7e]+$"  # printable ASCII: it goes into an HTTP header as it is
LEFT_OUT: Any = None  # the default of a patch field that may be left out but never be null


class ProviderFields(Strict):
    """A provider's fields, each optional (a patch); null only where it means "no limit"."""

    provider_name: Name = LEFT_OUT
    provider_type: Annotated[str, PROVIDER_TYPE] = LEFT_OUT
    api_key: str = Field(default=LEFT_OUT, min_length=1, max_length=1000, pattern=API_KEY)
    limit: int = Field(default=LEFT_OUT, ge=1, le=10_000_000)
    time_window: float = Field(default=LEFT_OUT, gt=0, le=86_400 * 31)
    token_limit: int | None = Field(default=None, ge=1, le=10_000_000_000)
    max_concurrency: int | None = Field(default=None, ge=1, le=10_000)
    config: ProviderConfig = LEFT_OUT

    _type = field_validator("provider_type")(lambda v: None if v is None else provider_type(v))
    _int = integral("limit", "token_limit", "max_concurrency")


_AZURE = _any_case([ProviderType.AZURE, *(k for k, v in PROVIDER_ALIASES.items() if v == ProviderType.AZURE)])


class ProviderIn(ProviderFields):
    # What `azure_needs_endpoint` checks, as JSON Schema says it.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"provider_type": {"pattern": _AZURE}}, "required": ["provider_type"]},
            "then": {
                "required": ["config"],
                "properties": {
                    "config": {"required": ["endpoint"], "properties": {"endpoint": {"type": "string"}}}
                },
            },
        }
    )
    provider_name: Name
    provider_type: Annotated[str, PROVIDER_TYPE]
    api_key: str = Field(min_length=1, max_length=1000, pattern=API_KEY)
    limit: int = Field(ge=1, le=10_000_000)
    time_window: float = Field(default=60.0, gt=0, le=86_400 * 31)
    config: ProviderConfig = Field(default_factory=ProviderConfig)

    @model_validator(mode="after")
    def azure_needs_endpoint(self) -> ProviderIn:
        if self.provider_type == ProviderType.AZURE and not self.config.endpoint:
            raise ValueError("azure providers need config.endpoint (https://NAME.openai.azure.com)")
        return self


class ProviderPatch(ProviderFields):
    model_config = ConfigDict(json_schema_extra={"minProperties": 1})  # at least one field to change


class ProviderRef(Strict):
    provider_id: Annotated[str, Field(min_length=1, max_length=100)]
    weight: float = Field(default=1.0, gt=0, le=1000)


def _provider_form(value: Any) -> str:
    return "ref" if isinstance(value, dict) and "provider_id" in value else "inline"


QueueProvider = Annotated[
    Annotated[ProviderRef, Tag("ref")] | Annotated[ProviderIn, Tag("inline")],
    Discriminator(_provider_form),
]


Workers = Annotated[int, Field(ge=1, le=1000)]  # the deployment's MAX_WORKERS caps it further


class QueueIn(Strict):
    queue_id: str = Field(json_schema_extra={"pattern": QUEUE_ID.pattern})
    providers: list[QueueProvider] = Field(min_length=1, max_length=20)
    workers: Workers = 1

    _int = integral("workers")

    @field_validator("queue_id")
    @classmethod
    def queue_id_shape(cls, value: str) -> str:
        if not QUEUE_ID.match(value):
            raise ValueError("letters, digits, '-' and '_', starting with a letter or digit, ≤100")
        return value


class QueuePatch(Strict):
    workers: Workers

    _int = integral("workers")


# Request fields `extra` may not set: the message's own fields (the limiter reserves tokens by
# them), streaming (answers are read whole), and the SDKs' request options.
OWN_FIELDS = ("messages", "system", "model", "max_tokens", "temperature", "stream")
SDK_OPTIONS = ("extra_headers", "extra_query", "extra_body", "timeout")


class MessageFields(Strict):
    prompt: Text
    system: Text | None = None
    model: Name | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    custom_id: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    metadata: dict[str, Any] | None = Field(
        default=None, description=f"Any JSON object, at most {METADATA_BYTES:,} bytes as compact JSON."
    )
    extra: dict[str, Any] | None = None

    _int = integral("max_tokens")

    @field_validator("metadata")
    @classmethod
    def metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
            if size > METADATA_BYTES:
                raise ValueError(f"is {size:,} bytes as JSON; at most {METADATA_BYTES:,}")
        return value

    @field_validator("extra")
    @classmethod
    def extra_adds_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(set(value or {}) & {*OWN_FIELDS, *SDK_OPTIONS})
        if taken:
            raise ValueError(
                f"may not set {', '.join(taken)}: use the message's own fields "
                "(prompt, system, model, max_tokens, temperature); answers are not streamed"
            )
        return value


class MessageIn(MessageFields):
    queue_id: Name


class BatchIn(Strict):
    queue_id: Name
    messages: list[MessageFields] = Field(min_length=1)
    webhook_url: Url | None = None
    webhook_event: Literal["on_complete"] = "on_complete"

    _url = field_validator("webhook_url")(check_url)


class WebhookIn(Strict):
    """A tenant's webhook endpoint: sent every batch event of the tenant."""

    url: Url
    description: str = Field(default="", max_length=500)

    _url = field_validator("url")(check_url)


class WebhookPatch(Strict):
    model_config = ConfigDict(json_schema_extra={"minProperties": 1})  # at least one field to change

    url: Url = LEFT_OUT
    description: str = Field(default=LEFT_OUT, max_length=500)
    enabled: bool = LEFT_OUT  # true turns an endpoint that answered 410 (or was turned off) on again

    _url = field_validator("url")(check_url)


def problems(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors(include_url=False):
        # pydantic's locations also name the union member tried ("ref", "inline", "str[...]")
        path = [p for p in err["loc"] if p not in ("ref", "inline") and "[" not in str(p)]
        out.append(field_error(path, err["msg"].removeprefix("Value error, ")))
    return out


TENANT_ID = r"^[a-z0-9][a-z0-9-]{0,39}$"  # it names broker queues: airl.<tenant>.<queue>


class TenantIn(Strict):
    tenant_id: str | None = Field(default=None, pattern=TENANT_ID)
    name: str = Field(default="", max_length=200)


class KeyIn(Strict):
    replace: bool = False  # revoke the tenant's other keys at once: a rotation


MAX_DEPTH = 32  # levels of nesting a body may have


def load_json(raw: bytes) -> Any:
    """A request body decoded: 400 if it is not UTF-8 JSON or is nested more than MAX_DEPTH
    levels deep, 422 naming the field if a string in it holds a NUL character (Postgres stores
    none). The walk keeps one iterator per level, so it costs memory by depth, not by size."""
    too_deep = f"The body is nested too deeply (at most {MAX_DEPTH} levels)."
    try:
        text = raw.decode("utf-8")  # json.loads would take UTF-16 and UTF-32 bytes too
        data = json.loads(text)
    except RecursionError:
        raise BadRequest(too_deep) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}") from None
    nul = "\\u0000" in text  # the only way a NUL can be in JSON text
    if nul and isinstance(data, str) and "\x00" in data:
        raise _nul(())
    if not isinstance(data, dict | list):
        return data
    levels: list[tuple[Iterator[tuple[str | int, Any]], tuple[str | int, ...]]] = [(_items(data), ())]
    while levels:
        children, at = levels[-1]
        step = next(children, None)
        if step is None:
            levels.pop()
            continue
        key, child = step
        if nul and isinstance(key, str) and "\x00" in key:
            raise _nul((*at, key))
        if isinstance(child, dict | list):
            if len(levels) >= MAX_DEPTH:
                raise BadRequest(too_deep)
            levels.append((_items(child), (*at, key)))
        elif nul and isinstance(child, str) and "\x00" in child:
            raise _nul((*at, key))
    return data


def _items(value: dict[str, Any] | list[Any]) -> Iterator[tuple[str | int, Any]]:
    return iter(value.items()) if isinstance(value, dict) else enumerate(value)


def _nul(path: Sequence[str | int]) -> ValidationFailed:
    return invalid([field_error(path, "contains a NUL character (\\u0000), which cannot be stored")])


def parse(model: type[M], data: Any) -> M:
    """Validate decoded JSON into `model`, or raise a 400/422 naming every bad field."""
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(problems(exc)) from None
