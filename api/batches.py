"""``/api/batches``: create (JSON, streamed NDJSON or CSV), list, show, recipients, and the
controls: pause, resume, cancel, send (a draft)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from api import app as api_app
from engine import batches, control, intake
from engine.errors import BadRequest, UnsupportedMediaType, ValidationError
from engine.services import Services

Handler = Callable[[web.Request], Awaitable[web.Response]]

_STREAM_CHUNK = 1 << 20


async def create(request: web.Request) -> web.Response:
    services = request.app[api_app.SERVICES]
    kind = request.content_type
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 255:
        raise ValidationError("Idempotency-Key: 1 to 255 characters", {"header": "Idempotency-Key"})
    query = dict(request.query)
    if kind in ("application/json", "application/octet-stream", ""):
        body = await request.read()
        spec, rows = intake.parse_json_request(body)
        digest = intake.request_digest(body)
    elif kind in ("application/x-ndjson", "application/jsonl", "text/csv"):
        chunks = request.content.iter_chunked(_STREAM_CHUNK)
        if kind == "text/csv":
            fields, rows = query, intake.csv_rows(chunks)
        else:
            header, rows = await intake.split_ndjson_header(intake.ndjson_rows(chunks))
            fields = {**query, **(header or {})}
        spec = intake.parse_batch_fields(fields, allow_recipients=False)
        # A streamed body is bound by its parameters and length (it is not buffered).
        digest = intake.request_digest(
            request.query_string.encode(), str(request.content_length).encode()
        )
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {kind!r}: use application/json, application/x-ndjson or text/csv"
        )
    try:
        created = await intake.create_batch(
            services, request[api_app.TENANT], spec, rows, idempotency_key=key, request_hash=digest
        )
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8", code="invalid_encoding") from None
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    return api_app.json_response(created.as_dict(), status=201, headers=headers)


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
    for name, action in (("pause", control.pause), ("resume", control.resume),
                         ("cancel", control.cancel), ("send", control.send)):  # fmt: skip
        app.router.add_post(f"/api/batches/{{id}}/{name}", _control(action))
