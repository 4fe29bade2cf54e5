"""The HTTP API: each route parses, calls one service, and answers. Errors map in `route`."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from typing import Any

from ai_rate_limiter.bootstrap import Container, container
from ai_rate_limiter.errors import AppError, BadRequest, PayloadTooLarge, UnsupportedMediaType
from ai_rate_limiter.services import batches, health, messages, monitoring, providers, queues, tenants
from chalice import Chalice, Response
from chalice.app import Request

app = Chalice(app_name="ai-rate-limiter")
PROBLEM = "application/problem+json"


def json_response(body: Any, status: int, content_type: str = "application/json") -> Response:
    return Response(body=body, status_code=status, headers={"Content-Type": content_type})


def problem(status: int, title: str, detail: str, **extra: Any) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    response = json_response(body, status, PROBLEM)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ai-rate-limiter"'
    return response


_caller = threading.local()  # who sent the request being served


def route(
    path: str, method: str, status: int = 200, access: str = "tenant"
) -> Callable[[Callable[..., Any]], Any]:
    """Register a view; domain errors become RFC 9457 problem responses, here and only here.
    `access`: "tenant" (any valid key; the admin key is the default tenant), "admin" (the admin
    key only) or "public"."""

    def register(view: Callable[..., Any]) -> Any:
        @functools.wraps(view)
        def answer(**params: str) -> Response:
            _caller.who = None
            try:
                if access != "public":
                    _caller.who = tenants.caller(c(), request().headers)
                    if access == "admin":
                        tenants.admin_only(_caller.who)
                result = view(**params)
            except AppError as exc:
                return problem(exc.status, exc.title, exc.detail, **exc.extra)
            finally:
                _caller.who = None
            return result if isinstance(result, Response) else json_response(result, status)

        return app.route(path, methods=[method], content_types=["*/*"])(answer)

    return register


def c() -> Container:
    return container()


def tenant() -> str:
    who: tenants.Caller | None = _caller.who
    assert who is not None, "only called while serving an authenticated request"
    return who.tenant


def request() -> Request:
    current = app.current_request
    assert current is not None, "only called while serving a request"
    return current


def body() -> Any:
    request_ = request()
    media = (request_.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType("Send the body as application/json.")
    raw = request_.raw_body or b""
    if len(raw) > c().settings.max_body_bytes:
        raise PayloadTooLarge(f"The body exceeds {c().settings.max_body_bytes} bytes.")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}") from None


def query() -> dict[str, str]:
    return dict(request().query_params or {})


@route("/health", "GET", access="public")
def get_health() -> Response:
    ok, report = health.check(c())
    return json_response(report, 200 if ok else 503)


@route("/provider/create", "POST", 201)
def create_provider() -> Any:
    return providers.create(c(), tenant(), body())


@route("/providers", "GET")
def list_providers() -> Any:
    return providers.list_all(c(), tenant())


@route("/provider/{provider_id}", "GET")
def get_provider(provider_id: str) -> Any:
    return providers.get(c(), tenant(), provider_id)


@route("/provider/update/{provider_id}", "PATCH")
def update_provider(provider_id: str) -> Any:
    return providers.update(c(), tenant(), provider_id, body())


@route("/provider/delete/{provider_id}", "DELETE")
def delete_provider(provider_id: str) -> Any:
    providers.delete(c(), tenant(), provider_id)
    return {"provider_id": provider_id, "deleted": True}


@route("/queue/create", "POST", 201)
def create_queue() -> Any:
    return queues.create(c(), tenant(), body())


@route("/queues", "GET")
def list_queues() -> Any:
    return queues.list_all(c(), tenant())


@route("/queue/{queue_id}", "GET")
def get_queue(queue_id: str) -> Any:
    return queues.get(c(), tenant(), queue_id)


@route("/queue/{queue_id}", "PATCH")
def update_queue(queue_id: str) -> Any:
    return queues.update(c(), tenant(), queue_id, body())


@route("/workers", "GET")
def get_workers() -> Any:
    return monitoring.workers_view(c(), tenant())


@route("/queue/{queue_id}", "DELETE")
def delete_queue(queue_id: str) -> Any:
    return queues.delete(c(), tenant(), queue_id)


@route("/message/create", "POST", 202)
def create_message() -> Any:
    return messages.submit(c(), tenant(), body())


@route("/message/read/{message_id}", "GET")
def read_message(message_id: str) -> Any:
    return messages.read(c(), tenant(), message_id)


@route("/message/delete/{message_id}", "DELETE")
def delete_message(message_id: str) -> Any:
    return messages.delete(c(), tenant(), message_id)


@route("/batch/{batch_id}", "GET")
def get_batch(batch_id: str) -> Any:
    return batches.progress(c(), tenant(), batch_id)


@route("/batch/{batch_id}/messages", "GET")
def batch_messages(batch_id: str) -> Any:
    return batches.messages(c(), tenant(), batch_id, query())


@route("/batch/{batch_id}/results", "GET")
def batch_results(batch_id: str) -> Response:
    content_type, payload, next_cursor = batches.results(c(), tenant(), batch_id, query())
    headers: dict[str, str | list[str]] = {"Content-Type": content_type}
    if next_cursor is not None:
        headers["X-Next-Cursor"] = next_cursor
        headers["Link"] = batches.next_link(batch_id, query(), next_cursor)
    return Response(payload, status_code=200, headers=headers)


@route("/admin/tenants", "POST", 201, access="admin")
def create_tenant() -> Any:
    return tenants.create(c(), body())


@route("/admin/tenants", "GET", access="admin")
def list_tenants() -> Any:
    return tenants.list_all(c())


@route("/admin/tenants/{tenant_id}/keys", "POST", 201, access="admin")
def add_tenant_key(tenant_id: str) -> Any:
    return tenants.add_key(c(), tenant_id, body() if request().raw_body else None)


@route("/admin/tenants/{tenant_id}/keys/{key_id}", "DELETE", access="admin")
def revoke_tenant_key(tenant_id: str, key_id: str) -> Any:
    tenants.revoke_key(c(), tenant_id, key_id)
    return {"tenant_id": tenant_id, "key_id": key_id, "revoked": True}
