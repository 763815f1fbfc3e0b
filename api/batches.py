"""``/api/batches``: create (JSON, streamed NDJSON or CSV), list, show, recipients, and the
controls: pause, resume, cancel, send (a draft)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from api import app as api_app
from engine import batches, control, intake
from engine.errors import BadRequest, UnsupportedMediaType, ValidationError
from engine.services import Services

Handler = Callable[[web.Request], Awaitable[web.Response]]

_STREAM_CHUNK = 1 << 20
_JSON = ("application/json", "application/octet-stream", "")
_STREAMED = ("application/x-ndjson", "application/jsonl", "text/csv")


async def create(request: web.Request) -> web.Response:
    services = request.app[api_app.SERVICES]
    kind = request.content_type
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 255:
        raise ValidationError("Idempotency-Key: 1 to 255 characters", {"header": "Idempotency-Key"})
    query = dict(request.query)
    if kind in _JSON:
        body = await request.read()
        spec, rows = intake.parse_json_request(body)
        digest = intake.request_digest(body)
    elif kind in _STREAMED:
        if kind == "text/csv":
            fields, rows = query, _streamed_rows(request)
        else:
            header, rows = await intake.split_ndjson_header(_streamed_rows(request))
            fields = {**query, **(header or {})}
        spec = intake.parse_batch_fields(fields, allow_recipients=False)
        # A streamed body is bound by its parameters and length (it is not buffered).
        digest = intake.request_digest(
            request.query_string.encode(), str(request.content_length).encode()
        )
    else:
        raise _unsupported(kind)
    try:
        created = await intake.create_batch(
            services, request[api_app.TENANT], spec, rows, idempotency_key=key, request_hash=digest
        )
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8", code="invalid_encoding") from None
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    return api_app.json_response(created.as_dict(), status=201, headers=headers)


async def append(request: web.Request) -> web.Response:
    """More recipients for a draft: JSON (``{"recipients": [...]}``), NDJSON or CSV."""
    kind = request.content_type
    if kind in _JSON:
        body = await api_app.json_body(request)
        items = body.get("recipients") if isinstance(body, dict) else body
        if not isinstance(items, list):
            raise ValidationError("recipients: must be a list", {"field": "recipients"})
        rows = intake.list_rows(items)
    elif kind in _STREAMED:
        rows = _streamed_rows(request)
    else:
        raise _unsupported(kind)
    try:
        added = await intake.append_recipients(
            request.app[api_app.SERVICES], request[api_app.TENANT], request.match_info["id"], rows
        )
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8", code="invalid_encoding") from None
    return api_app.json_response(added.as_dict())


def _streamed_rows(request: web.Request) -> AsyncIterator[list[Any]]:
    chunks = request.content.iter_chunked(_STREAM_CHUNK)
    if request.content_type == "text/csv":
        return intake.csv_rows(chunks)
    return intake.ndjson_rows(chunks)


def _unsupported(kind: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"unsupported Content-Type {kind!r}: use application/json, application/x-ndjson or text/csv"
    )


async def index(request: web.Request) -> web.Response:
    result = await batches.list_batches(
        request.app[api_app.SERVICES].pool,
        request[api_app.TENANT],
        status=request.query.get("status"),
        external_id=request.query.get("external_id"),
        limit=api_app.query_int(request, "limit"),
        cursor=request.query.get("cursor"),
    )
    return api_app.json_response(result)


async def show(request: web.Request) -> web.Response:
    result = await batches.get_batch(
        request.app[api_app.SERVICES].pool, request[api_app.TENANT], request.match_info["id"]
    )
    return api_app.json_response(result)


async def recipients(request: web.Request) -> web.Response:
    result = await batches.list_recipients(
        request.app[api_app.SERVICES].pool,
        request[api_app.TENANT],
        request.match_info["id"],
        status=request.query.get("status"),
        limit=api_app.query_int(request, "limit"),
        cursor=request.query.get("cursor"),
    )
    return api_app.json_response(result)


def _control(action: Callable[[Services, str, str], Awaitable[dict[str, Any]]]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        services, tenant = request.app[api_app.SERVICES], request[api_app.TENANT]
        return api_app.json_response(await action(services, tenant, request.match_info["id"]))

    return handler


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/batches", create)
    app.router.add_get("/api/batches", index)
    app.router.add_get("/api/batches/{id}", show)
    app.router.add_get("/api/batches/{id}/recipients", recipients)
    app.router.add_post("/api/batches/{id}/recipients", append)
    for name, action in (("pause", control.pause), ("resume", control.resume),
                         ("cancel", control.cancel), ("send", control.send)):  # fmt: skip
        app.router.add_post(f"/api/batches/{{id}}/{name}", _control(action))
