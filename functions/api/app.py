"""The HTTP API: each route parses, calls one service, and answers. Errors map in `route`."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ai_rate_limiter.bootstrap import Container, container
from ai_rate_limiter.domain.schemas import (
    BatchIn,
    KeyIn,
    MessageIn,
    ProviderIn,
    ProviderPatch,
    QueueIn,
    QueuePatch,
    TenantIn,
    WebhookIn,
    WebhookPatch,
    load_json,
)
from ai_rate_limiter.errors import AppError, PayloadTooLarge, UnsupportedMediaType
from ai_rate_limiter.services import (
    batches,
    endpoints,
    health,
    inbound,
    messages,
    monitoring,
    providers,
    queues,
    tenants,
)
from ai_rate_limiter.services.openapi import Operation, document
from chalice import Chalice, Response
from chalice.app import Request
from pydantic import BaseModel

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


@app.middleware("http")
def chalice_errors_as_problems(event: Any, get_response: Callable[[Any], Response]) -> Response:
    """Chalice's own error answers (a method the route does not have, an unhandled error) in
    the API's shape: problem+json, headers such as `Allow` kept."""
    response = get_response(event)
    body = response.body
    if response.status_code >= 400 and isinstance(body, dict) and set(body) == {"Code", "Message"}:
        titles = {405: "Method Not Allowed", 500: "Internal Server Error"}
        detail = "Something went wrong on our side." if response.status_code >= 500 else str(body["Message"])
        answer = problem(response.status_code, titles.get(response.status_code, "Error"), detail)
        answer.headers.update({k: v for k, v in response.headers.items() if k.lower() != "content-type"})
        return answer
    return response


_caller = threading.local()  # who sent the request being served


OPERATIONS: list[Operation] = []  # what /openapi.json describes


def route(
    path: str,
    method: str,
    status: int = 200,
    access: str = "tenant",
    body: Sequence[type[BaseModel]] = (),
    **described: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """Register a view; domain errors become RFC 9457 problem responses, here and only here.
    `access`: "tenant" (any valid key; the admin key is the default tenant), "admin" (the admin
    key only) or "public". `body`: the models its service validates the body with (one of
    them), and `described` the rest of what OpenAPI says of it (`openapi.Operation`)."""

    def register(view: Callable[..., Any]) -> Any:
        summary = (view.__doc__ or view.__name__.replace("_", " ").capitalize()).strip().splitlines()[0]
        OPERATIONS.append(Operation(path, method, status, access, view.__name__, summary, body, **described))

        @functools.wraps(view)
        def answer(**params: str) -> Response:
            _caller.who = None
            try:
                if access != "public":
                    _caller.who = tenants.caller(c(), request().headers)
                    if access == "admin":
                        tenants.admin_only(_caller.who)
                    inbound.admit(c(), _caller.who.tenant, method)
                result = view(**params)
            except AppError as exc:
                response = problem(exc.status, exc.title, exc.detail, **exc.extra)
                response.headers.update(exc.headers)
                return response
            finally:
                _caller.who = None
            return result if isinstance(result, Response) else json_response(result, status)

        return app.route(path, methods=[method], content_types=["*/*"])(answer)

    return register


PAGE = [("limit", {"type": "integer", "minimum": 1}), ("cursor", {"type": "integer", "minimum": -1})]


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
    if isinstance(raw, str):
        raw = raw.encode()
    if len(raw) > c().settings.max_body_bytes:
        raise PayloadTooLarge(f"The body exceeds {c().settings.max_body_bytes} bytes.")
    return load_json(raw)


def query() -> dict[str, str]:
    return dict(request().query_params or {})


@route("/health", "GET", access="public")
def get_health() -> Response:
    """Each dependency's state; with a key, why one is down and the tenant's providers out of quota"""
    who = None
    if tenants.presented_key(request().headers):
        with contextlib.suppress(AppError):  # a bad key gets what anyone gets
            who = tenants.caller(c(), request().headers)
    ok, report = health.check(c(), None if who is None else who.tenant)
    return json_response(report, 200 if ok else 503)


@route("/provider/create", "POST", 201, body=[ProviderIn], yields=["provider_id"])
def create_provider() -> Any:
    return providers.create(c(), tenant(), body())


@route("/providers", "GET")
def list_providers() -> Any:
    return providers.list_all(c(), tenant())


@route("/provider/{provider_id}", "GET")
def get_provider(provider_id: str) -> Any:
    return providers.get(c(), tenant(), provider_id)


@route("/provider/update/{provider_id}", "PATCH", body=[ProviderPatch])
def update_provider(provider_id: str) -> Any:
    return providers.update(c(), tenant(), provider_id, body())


@route("/provider/delete/{provider_id}", "DELETE")
def delete_provider(provider_id: str) -> Any:
    providers.delete(c(), tenant(), provider_id)
    return {"provider_id": provider_id, "deleted": True}


@route("/queue/create", "POST", 201, body=[QueueIn], yields=["queue_id"])
def create_queue() -> Any:
    return queues.create(c(), tenant(), body())


@route("/queues", "GET")
def list_queues() -> Any:
    return queues.list_all(c(), tenant())


@route("/queue/{queue_id}", "GET")
def get_queue(queue_id: str) -> Any:
    return queues.get(c(), tenant(), queue_id)


@route("/queue/{queue_id}", "PATCH", body=[QueuePatch])
def update_queue(queue_id: str) -> Any:
    return queues.update(c(), tenant(), queue_id, body())


@route("/workers", "GET")
def get_workers() -> Any:
    return monitoring.workers_view(c(), tenant())


@route("/queue/{queue_id}", "DELETE")
def delete_queue(queue_id: str) -> Any:
    return queues.delete(c(), tenant(), queue_id)


@route(
    "/message/create",
    "POST",
    202,
    body=[MessageIn, BatchIn],
    yields=["message_id", "batch_id"],
    headers=[("Idempotency-Key", {"type": "string", "pattern": messages.IDEMPOTENCY_KEY.pattern})],
)
def create_message() -> Any:
    """Send a message or a batch; with an Idempotency-Key, sent again it answers what it did first"""
    return messages.submit(c(), tenant(), body(), request().headers.get("idempotency-key"))


@route("/message/read/{message_id}", "GET")
def read_message(message_id: str) -> Any:
    return messages.read(c(), tenant(), message_id)


@route("/message/delete/{message_id}", "DELETE")
def delete_message(message_id: str) -> Any:
    return messages.delete(c(), tenant(), message_id)


@route("/message/{message_id}/retry", "POST", 202)
def retry_message(message_id: str) -> Any:
    """Send a failed or cancelled message again"""
    return messages.retry(c(), tenant(), message_id)


@route("/batch/{batch_id}", "GET")
def get_batch(batch_id: str) -> Any:
    return batches.progress(c(), tenant(), batch_id)


@route("/batch/{batch_id}/messages", "GET", query=PAGE)
def batch_messages(batch_id: str) -> Any:
    return batches.messages(c(), tenant(), batch_id, query())


@route(
    "/batch/{batch_id}/results",
    "GET",
    query=[("format", {"enum": ["json", "csv"]}), *PAGE],
    produces=["application/json", "text/csv"],
)
def batch_results(batch_id: str) -> Response:
    content_type, payload, next_cursor = batches.results(c(), tenant(), batch_id, query())
    headers: dict[str, str | list[str]] = {"Content-Type": content_type}
    if next_cursor is not None:
        headers["X-Next-Cursor"] = next_cursor
        headers["Link"] = batches.next_link(batch_id, query(), next_cursor)
    return Response(payload, status_code=200, headers=headers)


@route("/batch/{batch_id}/retry-failed", "POST", 202)
def retry_failed(batch_id: str) -> Any:
    """Send the batch's failed messages again"""
    return batches.retry_failed(c(), tenant(), batch_id)


@route("/batch/{batch_id}/cancel", "POST")
def cancel_batch(batch_id: str) -> Any:
    """Cancel what has not started; what is done is kept"""
    return batches.cancel(c(), tenant(), batch_id)


@route("/webhooks", "POST", 201, body=[WebhookIn], yields=["webhook_id"])
def create_webhook() -> Any:
    """Add a webhook endpoint: every batch event of the tenant, signed with its secret (shown once)"""
    return endpoints.create(c(), tenant(), body())


@route("/webhooks", "GET")
def list_webhooks() -> Any:
    return endpoints.list_all(c(), tenant())


@route("/webhooks/{webhook_id}", "GET")
def get_webhook(webhook_id: str) -> Any:
    return endpoints.get(c(), tenant(), webhook_id)


@route("/webhooks/{webhook_id}", "PATCH", body=[WebhookPatch])
def update_webhook(webhook_id: str) -> Any:
    """Change an endpoint's URL or description, or turn it off or on again"""
    return endpoints.update(c(), tenant(), webhook_id, body())


@route("/webhooks/{webhook_id}", "DELETE")
def delete_webhook(webhook_id: str) -> Any:
    endpoints.delete(c(), tenant(), webhook_id)
    return {"webhook_id": webhook_id, "deleted": True}


@route("/admin/tenants", "POST", 201, access="admin", body=[TenantIn], yields=["tenant_id", "key_id"])
def create_tenant() -> Any:
    return tenants.create(c(), body())


@route("/admin/tenants", "GET", access="admin")
def list_tenants() -> Any:
    return tenants.list_all(c())


@route(
    "/admin/tenants/{tenant_id}/keys",
    "POST",
    201,
    access="admin",
    body=[KeyIn],
    body_required=False,
    yields=["tenant_id", "key_id"],
)
def add_tenant_key(tenant_id: str) -> Any:
    return tenants.add_key(c(), tenant_id, body() if request().raw_body else {})  # the body is optional


@route("/admin/tenants/{tenant_id}/keys/{key_id}", "DELETE", access="admin")
def revoke_tenant_key(tenant_id: str, key_id: str) -> Any:
    tenants.revoke_key(c(), tenant_id, key_id)
    return {"tenant_id": tenant_id, "key_id": key_id, "revoked": True}


@route("/openapi.json", "GET")
def get_openapi() -> Any:
    """This API's OpenAPI 3.1 description"""
    return described(c().settings.max_workers)


@functools.cache
def described(max_workers: int) -> dict[str, Any]:
    """Built once per process: the routes are all registered at import."""
    return document(OPERATIONS, "AI Rate Limiter", "1", max_workers)
