"""Schemathesis hooks for `test_openapi_fuzz` (loaded through SCHEMATHESIS_HOOKS)."""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from schemathesis import GenerationMode
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.openapi.checks import RejectedPositiveData

URL_FIELDS = ("endpoint", "webhook_url", "url")
# A URL the stack's EGRESS_ALLOW lets through (its fake provider), for schema-valid bodies.
REACHABLE = os.environ.get("FUZZ_REACHABLE_URL", "")

# What the egress guard says of a URL that fits the published pattern but points nowhere a
# request may go: a name that does not resolve (the fuzzer's hosts are random), or one that
# resolves to an internal address. No schema can say where a name points.
EGRESS_REFUSALS = ("egress refused: ", " does not resolve")
# What the API says of an Idempotency-Key sent again with another body: whether a key was used
# before is state, which no schema can say either (the fuzzer's short keys come round often).
KEY_REUSED = "was sent before with another body"


def _reachable(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REACHABLE if k in URL_FIELDS and isinstance(v, str) else _reachable(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_reachable(v) for v in value]
    return value


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """A schema-valid body names a URL requests may go to, so that what it makes (a provider, a
    queue, a batch) exists for the calls that follow; random hosts do not resolve."""
    if REACHABLE and case.meta is not None and case.meta.generation.mode == GenerationMode.POSITIVE:
        case.body = _reachable(case.body)
    return case


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but three: a schema-valid request refused only because each URL in it
    was refused by the egress guard, or only because its Idempotency-Key came with another body
    before, and a "schema-violating" request that sent no body to an operation whose body is
    optional (a negative body of null goes out as no body at all)."""
    if isinstance(failure, AcceptedNegativeData):
        return not (not response.request.body and not _body_required(case))
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 422:
        return True
    try:
        errors = response.json()["errors"]
    except (ValueError, KeyError, TypeError):
        return True
    return not errors or not all(
        isinstance(e, dict)
        and (
            (
                str(e.get("field", "")).rsplit(".", 1)[-1] in URL_FIELDS
                and any(mark in str(e.get("message", "")) for mark in EGRESS_REFUSALS)
            )
            or (e.get("field") == "Idempotency-Key" and KEY_REUSED in str(e.get("message", "")))
        )
        for e in errors
    )


def _body_required(case: Any) -> bool:
    body = case.operation.definition.raw.get("requestBody")
    return bool(body and body.get("required"))
