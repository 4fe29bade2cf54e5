"""How many tokens a request will use, estimated before it is sent, and how many the provider
counts against its limit once it has answered.

OpenAI-family models (OpenAI, Azure, DeepSeek) are counted with OpenAI's BPE encodings
(o200k_base / cl100k_base, as tiktoken defines them, from the `bpe-openai` package, which ships
them; tiktoken itself downloads them at first use) plus the chat format's overhead of 4 tokens
a message and 3 for the reply, and never less than four characters a token. Claude models:
characters / 3.5, Anthropic's own rule of thumb, plus 5 a message. Either way the estimate is
settled against the usage the provider reports: OpenAI counts a request's `max_tokens` against
the token limit whatever the answer's length, so only the prompt's estimate is corrected;
Anthropic counts the tokens actually used.
"""

from __future__ import annotations

import math
import threading
from functools import lru_cache
from typing import Any

from .models import ChatRequest, Provider, ProviderType

DEFAULT_MAX_TOKENS = 1024  # reserved for the answer when neither message nor provider sets max_tokens
CHARS_PER_TOKEN = 3.5


_loading = threading.Lock()
_loaded: set[str] = set()


def _encoding(model: str) -> Any:
    """The encoding for `model`, loaded once (loading takes most of a second): the lock only
    keeps threads from loading it side by side."""
    if model in _loaded:
        return _load_encoding(model)
    with _loading:
        encoding = _load_encoding(model)
        _loaded.add(model)
        return encoding


@lru_cache(maxsize=32)
def _load_encoding(model: str) -> Any:
    try:
        import bpe_openai
    except ImportError:  # pragma: no cover - the estimate below still works
        return None
    try:
        return bpe_openai.encoding_for_model(model)
    except Exception:
        return bpe_openai.get_encoding("o200k_base")


def _texts(req: ChatRequest) -> list[str]:
    texts = [req.system] if req.system else []
    for m in req.messages:
        content = m.get("content")
        if isinstance(content, list):
            texts += [str(part.get("text", "")) for part in content if isinstance(part, dict)]
        else:
            texts.append(str(content or ""))
    return texts


def input_tokens(provider: Provider, req: ChatRequest) -> int:
    """Never less than the provider will count: an estimate that falls short lets a window
    overfill until the settlement catches up."""
    texts = _texts(req)
    if provider.type is ProviderType.ANTHROPIC:
        return sum(math.ceil(len(t) / CHARS_PER_TOKEN) + 5 for t in texts)
    by_chars = sum(math.ceil(len(t) / 4) + 4 for t in texts) + 3
    enc = _encoding(req.model or provider.model)
    if enc is None:
        return by_chars
    return max(by_chars, sum(len(enc.encode_ordinary(t)) + 4 for t in texts) + 3)


def max_output_tokens(provider: Provider, req: ChatRequest) -> int:
    return int(req.max_tokens or provider.config.get("max_tokens") or DEFAULT_MAX_TOKENS)


def estimate(provider: Provider, req: ChatRequest) -> int:
    """Tokens to reserve: the prompt as counted here plus the most the answer may use."""
    return input_tokens(provider, req) + max_output_tokens(provider, req)


def charged(provider: Provider, req: ChatRequest, prompt_tokens: int, completion_tokens: int) -> int:
    """Tokens the provider counted against its limit, given the usage it reported."""
    if provider.type is ProviderType.ANTHROPIC:
        return prompt_tokens + completion_tokens
    return prompt_tokens + max(max_output_tokens(provider, req), completion_tokens)
