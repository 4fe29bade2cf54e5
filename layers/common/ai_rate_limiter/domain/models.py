"""Domain records: providers, chat requests, messages and their states."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
PENDING = frozenset({Status.QUEUED, Status.PROCESSING})


class ProviderType(StrEnum):
    OPENAI = "openai"
    AZURE = "azure"
    ANTHROPIC = "anthropic"
    DEEPSEEK = "deepseek"


PROVIDER_ALIASES = {"claude": ProviderType.ANTHROPIC, "azure_openai": ProviderType.AZURE}

DEFAULT_ENDPOINTS = {
    ProviderType.OPENAI: "https://api.openai.com/v1",
    ProviderType.DEEPSEEK: "https://api.deepseek.com",
    ProviderType.ANTHROPIC: "https://api.anthropic.com",
}
DEFAULT_MODELS = {
    ProviderType.OPENAI: "gpt-4o-mini",
    ProviderType.AZURE: "gpt-4o-mini",
    ProviderType.DEEPSEEK: "deepseek-chat",
    ProviderType.ANTHROPIC: "claude-3-5-haiku-latest",
}


@dataclass(frozen=True)
class Provider:
    id: str
    name: str
    type: ProviderType
    api_key: str
    limit: int
    time_window: float
    token_limit: int | None = None
    max_concurrency: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "active"
    version: str = ""
    weight: float = 1.0  # its share in the queue it was loaded for

    @property
    def model(self) -> str:
        return str(self.config.get("model") or DEFAULT_MODELS[self.type])

    @property
    def endpoint(self) -> str | None:
        return self.config.get("endpoint") or DEFAULT_ENDPOINTS.get(self.type)

    @property
    def limiter_key(self) -> str:
        """Identity of the rate limit: the same key, endpoint and model share one limit."""
        raw = "|".join((self.type, self.endpoint or "", self.api_key, self.model))
        return hashlib.sha256(raw.encode()).hexdigest()[:24]


def mask_key(api_key: str) -> str:
    return "****" + api_key[-4:] if len(api_key) >= 12 else "****"


@dataclass(frozen=True)
class ChatRequest:
    """A full chat request: what a provider is asked, independent of which provider."""

    messages: list[dict[str, Any]]
    system: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"messages": self.messages}
        for name in ("system", "model", "max_tokens", "temperature"):
            if (value := getattr(self, name)) is not None:
                data[name] = value
        if self.extra:
            data["extra"] = self.extra
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChatRequest:
        return cls(
            messages=list(data["messages"]),
            system=data.get("system"),
            model=data.get("model"),
            max_tokens=data.get("max_tokens"),
            temperature=data.get("temperature"),
            extra=dict(data.get("extra") or {}),
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ProviderResult:
    text: str
    usage: Usage
    raw: dict[str, Any]
    latency_ms: int
    model: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClaimedMessage:
    """A message this worker holds a lease on; `attempt` fences every write, `tries` counts the
    provider calls spent from its budget."""

    id: str
    tenant_id: str
    queue_id: str
    batch_id: str | None
    request: ChatRequest
    attempt: int
    tries: int = 0
    last_error: str | None = None  # why its last try ended without an answer
