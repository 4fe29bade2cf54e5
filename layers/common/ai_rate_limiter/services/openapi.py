"""The API's OpenAPI 3.1 description, built from the routes as they are registered and from the
pydantic models the services validate bodies with (OpenAPI 3.1 schemas are JSON Schema, which is
what pydantic writes)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ..domain.schemas import MAX_DEPTH, QUEUE_ID, TENANT_ID

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
    headers: Sequence[tuple[str, dict[str, Any]]] = field(default_factory=tuple)  # optional ones
    produces: Sequence[str] = ("application/json",)
    yields: Sequence[str] = ()  # ids in the answer's body that other operations take in their path


UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# What each id in a path looks like (ids the API makes are UUIDs); any other is unknown: 404.
PATH_PATTERNS = {"tenant_id": TENANT_ID, "queue_id": QUEUE_ID.pattern}


def path_params(path: str) -> list[str]:
    return re.findall(r"\{([^}]+)\}", path)


def links(op: Operation, operations: Sequence[Operation]) -> dict[str, Any]:
    """OpenAPI links from `op`'s answer to every operation whose path takes only ids it yields,
    and to every operation with no path ids whose body takes one (a queue's id to send messages
    to it), so a client, or a fuzzer's stateful phase, can follow what was made."""
    out: dict[str, Any] = {}
    for target in operations:
        params = path_params(target.path)
        fields = sorted({name for m in target.body for name in m.model_fields} & set(op.yields))
        if target is op or not ((params and set(params) <= set(op.yields)) or (fields and not params)):
            continue
        link: dict[str, Any] = {"operationId": target.name}
        if params:
            link["parameters"] = {name: f"$response.body#/{name}" for name in params}
        else:
            link["requestBody"] = {name: f"$response.body#/{name}" for name in fields}
        out[target.name] = link
    return out


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


NO_NUL = r"^[^\x00]*$"  # Postgres stores no NUL character, so the API takes none
JSON_VALUE = "#/components/schemas/JsonValue"


def _json_value_schema() -> dict[str, Any]:
    """Any JSON value without a NUL character: what free-form objects (metadata, extra, a
    provider's config) hold."""
    return {
        "anyOf": [
            {"type": "null"},
            {"type": "boolean"},
            {"type": "number"},
            {"type": "string", "pattern": NO_NUL},
            {"type": "array", "items": {"$ref": JSON_VALUE}},
            {
                "type": "object",
                "additionalProperties": {"$ref": JSON_VALUE},
                "propertyNames": {"pattern": NO_NUL},
            },
        ]
    }


def _subschemas(schema: Any) -> Iterator[dict[str, Any]]:
    """Every object in a JSON Schema document, outermost first."""
    if isinstance(schema, list):
        for item in schema:
            yield from _subschemas(item)
    elif isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _subschemas(value)


def _without_nul(schemas: Any) -> None:
    """Say that no string holds a NUL character: a string with no pattern of its own gets
    NO_NUL (the patterns the models give exclude NUL already), and an object open to any
    property holds JSON values without one."""
    for schema in _subschemas(schemas):
        if schema.get("type") == "string" and "pattern" not in schema and "enum" not in schema:
            schema["pattern"] = NO_NUL
        if schema.get("type") == "object" and schema.get("additionalProperties", True) is True:
            schema["additionalProperties"] = {"$ref": JSON_VALUE}
            schema["propertyNames"] = {"pattern": NO_NUL}


def _without_null_defaults(schemas: Any) -> None:
    """A field that may be left out but not be null has no default of null."""
    for schema in _subschemas(schemas):
        if "default" in schema and schema["default"] is None and schema.get("type") not in (None, "null"):
            del schema["default"]


def document(operations: Sequence[Operation], title: str, version: str, max_workers: int) -> dict[str, Any]:
    models = sorted({m for op in operations for m in op.body}, key=lambda m: m.__name__)
    _, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = defs.get("$defs", {})
    _without_nul(schemas)
    _without_null_defaults(schemas)
    schemas.update(Problem=_problem_schema(), JsonValue=_json_value_schema())
    for schema in schemas.values():  # what the deployment allows (MAX_WORKERS), not the model's bound
        if "workers" in schema.get("properties", {}):
            schema["properties"]["workers"]["maximum"] = max_workers
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, links(op, operations))
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


def _operation(op: Operation, links: dict[str, Any]) -> dict[str, Any]:
    params = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": PATH_PATTERNS.get(name, UUID)},
        }
        for name in path_params(op.path)
    ]
    params += [
        {"name": name, "in": where, "required": False, "schema": schema}
        for where, given in (("query", op.query), ("header", op.headers))
        for name, schema in given
    ]
    answers: dict[str, Any] = {
        str(op.status): {
            "description": "OK" if op.status < 300 else "Done",
            "content": {
                media: {"schema": {"type": "object"} if "json" in media else {"type": "string"}}
                for media in op.produces
            },
            **({"links": links} if links else {}),
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
