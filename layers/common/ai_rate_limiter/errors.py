"""The one error root. `retryable` separates what may succeed later from what never will."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class AppError(Exception):
    status = 500
    title = "Internal Server Error"
    retryable = False

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that go with the problem."""
        return {}


class BadRequest(AppError):
    status, title = 400, "Bad Request"


class Unauthorized(AppError):
    status, title = 401, "Unauthorized"


class Forbidden(AppError):
    status, title = 403, "Forbidden"


class NotFound(AppError):
    status, title = 404, "Not Found"


class Conflict(AppError):
    status, title = 409, "Conflict"


class PayloadTooLarge(AppError):
    status, title = 413, "Content Too Large"


class UnsupportedMediaType(AppError):
    status, title = 415, "Unsupported Media Type"


class ValidationFailed(AppError):
    status, title = 422, "Unprocessable Content"


class TooManyRequests(AppError):
    """A tenant over one of the API's own limits."""

    status, title = 429, "Too Many Requests"

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def field_error(path: Sequence[str | int], message: str) -> dict[str, str]:
    """One invalid field, named two ways: a dotted path (`messages.3.prompt`) and a JSON
    pointer (RFC 6901: `/messages/3/prompt`; the empty pointer is the whole body)."""
    parts = [str(p) for p in path]
    pointer = "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)
    return {"field": ".".join(parts) or "(body)", "pointer": pointer, "message": message}


def invalid(errors: Sequence[dict[str, str]]) -> ValidationFailed:
    """422 naming every field of `errors` (`field_error`s); the detail names the first."""
    first = errors[0]
    return ValidationFailed(f"{first['field']}: {first['message']}", errors=list(errors))


class DependencyUnavailable(AppError):
    """Postgres, Redis or RabbitMQ could not be reached."""

    status, title, retryable = 503, "Service Unavailable", True


class LimiterUnavailable(DependencyUnavailable):
    """Redis, which holds the shared limiter, could not be reached."""


class ProviderError(AppError):
    """A provider call did not produce an answer."""

    status, title = 502, "Bad Gateway"


class RateLimited(ProviderError):
    retryable = True

    def __init__(self, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class ProviderUnavailable(ProviderError):
    """5xx, timeouts and connection failures."""

    retryable = True

    def __init__(self, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class ProviderRejected(ProviderError):
    """Any other 4xx: the request itself is wrong, retrying will not help."""


class QuotaExhausted(ProviderRejected):
    """The account has no quota left (`insufficient_quota`)."""


class LateForSlot(ProviderError):
    """The request would have left too long after its slot: it was not sent."""

    retryable = True

    def __init__(self, detail: str, late_s: float = 0.0) -> None:
        super().__init__(detail)
        self.late_s = late_s  # how long after its slot it would have left
