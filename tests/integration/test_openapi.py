"""GET /openapi.json: an OpenAPI 3.1 description of every route, from the models the services
validate with."""

from __future__ import annotations

import re
from typing import Any

from ai_rate_limiter.bootstrap import Container
from openapi_spec_validator import validate

from local.functions import load

from .conftest import Api


def described(api: Api) -> dict[str, Any]:
    r = api.call("get", "/openapi.json")
    assert r.status_code == 200
    doc: dict[str, Any] = r.json
    return doc


def test_the_description_is_valid_openapi_3_1_and_covers_every_route(api: Api) -> None:
    doc = described(api)
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    routes = load("api", "app").app.routes
    registered = {(path, method.lower()) for path, entries in routes.items() for method in entries}
    assert {(path, method) for path, ops in doc["paths"].items() for method in ops} == registered
    assert doc["paths"]["/health"]["get"]["security"] == []  # the one open route
    assert "401" in doc["paths"]["/queues"]["get"]["responses"]


def test_each_body_is_described_by_the_model_it_is_validated_with(api: Api) -> None:
    """An empty body to each route that takes one is refused naming only fields its schema
    describes, and naming every field its schema requires."""
    doc = described(api)
    schemas = doc["components"]["schemas"]
    tried = 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if "requestBody" not in op:
                continue
            schema = op["requestBody"]["content"]["application/json"]["schema"]
            names = [ref["$ref"].rsplit("/", 1)[1] for ref in schema.get("oneOf", [schema])]
            required = set.union(*(set(schemas[n].get("required", [])) for n in names))
            properties = set.union(*(set(schemas[n]["properties"]) for n in names))
            concrete = path.replace("{", "").replace("}", "")  # ids that do not exist
            r = api.call(method, concrete, {"not_a_field": 1})
            assert r.status_code in (404, 422), (method, path, r.body)
            if r.status_code == 422:
                fields = {e["field"].split(".")[0] for e in r.json["errors"]}
                assert fields <= properties | {"not_a_field", "(body)"}, (path, fields)
                assert "not_a_field" in fields or r.json["errors"][0]["field"] == "(body)"
                if len(names) == 1:
                    assert required <= fields, (path, required, fields)
            tried += 1
    assert tried >= 7


def test_the_description_says_what_validation_will_take(api: Api, container: Container) -> None:
    """Limits that validation applies beyond a field's type are in the description too."""
    schemas = described(api)["components"]["schemas"]
    for name in ("QueueIn", "QueuePatch"):
        assert schemas[name]["properties"]["workers"]["maximum"] == container.settings.max_workers
    assert schemas["QueueIn"]["properties"]["queue_id"]["pattern"].startswith("^[A-Za-z0-9]")
    kind = re.compile(schemas["ProviderIn"]["properties"]["provider_type"]["pattern"])
    assert all(kind.match(v) for v in ("openai", " Azure ", "CLAUDE", "deepseek", "azure_openai"))
    assert not any(kind.match(v) for v in ("", "open ai", "gpt"))
