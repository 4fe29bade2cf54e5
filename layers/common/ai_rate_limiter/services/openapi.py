"""The API's OpenAPI 3.1 description, built from the routes as they are registered and from the
pydantic models the services validate bodies with (OpenAPI 3.1 schemas are JSON Schema, which is
what pydantic writes)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ..domain.schemas import MAX_DEPTH

PROBLEM = "application/problem+json"
TITLES = {
    400: "Malformed JSON, not an object, or nested too deeply",
    401: "No API key, or one that is not valid",
    403: "A tenant's key on an admin route",
    404: "Unknown id (another tenant's ids are unknown)",
    405: "A method the route does not have",
    409: "Conflict",
    413: "A body over the size limit, or too many messages",
    415: "A body that is not JSON",
    422: "Invalid fields, each named in `errors`",
    429: "Over the tenant's limits (see Retry-After)",
    503: "A dependency is down",
}


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    status: int
    access: str  # public | tenant | admin
    name: str
    summary: str
    body: Sequence[type[BaseModel]] = ()  # one of these
    body_required: bool = True
    query: Sequence[tuple[str, dict[str, Any]]] = field(default_factory=tuple)
    produces: Sequence[str] = ("application/json",)


def _problem_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "field": {"type": "string"},
                        "pointer": {"type": "string"},
                        "message": {"type": "string"},
                    },
                },
            },
        },
    }


def document(operations: Sequence[Operation], title: str, version: str, max_workers: int) -> dict[str, Any]:
    models = sorted({m for op in operations for m in op.body}, key=lambda m: m.__name__)
    _, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = {**defs.get("$defs", {}), "Problem": _problem_schema()}
    for schema in schemas.values():  # what the deployment allows (MAX_WORKERS), not the model's bound
        if "workers" in schema.get("properties", {}):
            schema["properties"]["workers"]["maximum"] = max_workers
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "LLM prompts through providers' rate limits. Every error is problem+json "
                f"(RFC 9457); bodies are JSON objects nested at most {MAX_DEPTH} levels deep."
            ),
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": paths,
    }


def _operation(op: Operation) -> dict[str, Any]:
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in re.findall(r"\{([^}]+)\}", op.path)
    ]
    params += [
        {"name": name, "in": "query", "required": False, "schema": schema} for name, schema in op.query
    ]
    answers: dict[str, Any] = {
        str(op.status): {
            "description": "OK" if op.status < 300 else "Done",
            "content": {
                media: {"schema": {"type": "object"} if "json" in media else {"type": "string"}}
                for media in op.produces
            },
        }
    }
    errors = [404, 405, 429, 503]
    if op.access != "public":
        errors += [401]
    if op.access == "admin":
        errors += [403]
    if op.body or op.method in ("POST", "PATCH"):
        errors += [400, 409, 413, 415, 422]
    elif op.query:
        errors += [422]
    for status in sorted(set(errors)):
        answers[str(status)] = {
            "description": TITLES[status],
            "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    out: dict[str, Any] = {"operationId": op.name, "summary": op.summary, "responses": answers}
    if params:
        out["parameters"] = params
    if op.access == "public":
        out["security"] = []
    if op.body:
        refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in op.body]
        schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": schema}},
        }
    return out
