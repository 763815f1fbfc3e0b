"""``/api/batches``: create (JSON, streamed NDJSON or CSV), list, show, recipients, and the
controls: pause, resume, cancel, send (a draft)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from api import app as api_app
from api import body
from engine import batches, control, intake
from engine.errors import UnsupportedMediaType, ValidationError
from engine.services import Services
from engine.uploads import upload_slot

Handler = Callable[[web.Request], Awaitable[web.Response]]

_JSON = ("application/json", "application/octet-stream", "")
_STREAMED = ("application/x-ndjson", "application/jsonl", "text/csv")
# An Idempotency-Key: visible ASCII (the IETF draft's structured string), 1 to 255 long.
_KEY = re.compile(r"[!-~]{1,255}")


async def create(request: web.Request) -> web.Response:
    services, tenant = request.app[api_app.SERVICES], request[api_app.TENANT]
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY.fullmatch(key):
        raise ValidationError("Idempotency-Key: 1 to 255 visible ASCII characters",
                              {"header": "Idempotency-Key"})  # fmt: skip
    bound = key is not None
    async with upload_slot(services, tenant), _received(request, True, bound) as received:
        spec, rows, body_digest = received
        digest = None  # what the key is bound to: content type, query string, whole body
        if body_digest is not None:
            digest = intake.request_digest(request.content_type.encode(),
                                           request.query_string.encode(), body_digest)  # fmt: skip
        created = await intake.create_batch(
            services, tenant, spec, rows, idempotency_key=key, request_hash=digest
        )
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    return api_app.json_response(created.as_dict(), status=201, headers=headers)


async def append(request: web.Request) -> web.Response:
    """More recipients for a draft: JSON (``{"recipients": [...]}``), NDJSON or CSV."""
    services, tenant = request.app[api_app.SERVICES], request[api_app.TENANT]
    async with upload_slot(services, tenant), _received(request, False, False) as received:
        _, rows, _ = received
        added = await intake.append_recipients(services, tenant, request.match_info["id"], rows)
    return api_app.json_response(added.as_dict())


@contextlib.asynccontextmanager
async def _received(
    request: web.Request, fields: bool, digest: bool
) -> AsyncIterator[tuple[intake.BatchSpec | None, AsyncIterator[list[Any]], bytes | None]]:
    """The whole body received (``api.body``), then: the batch fields (``fields``: from the
    JSON body, the NDJSON header line or the query), its rows, and (``digest``) the
    body's sha256."""
    settings, kind = request.app[api_app.SETTINGS], request.content_type
    spec = None
    if kind in _JSON:
        data, raw = await body.read_json(request, settings)
        if fields:  # validating compiles the templates: off the event loop
            if request.query:
                raise ValidationError(
                    "batch fields go in the JSON body (query parameters are for CSV and NDJSON)",
                    {"field": next(iter(request.query))},
                )
            spec = await asyncio.to_thread(intake.parse_batch_fields, data)
            items = data.get("recipients", [] if spec.draft else None)
        elif isinstance(data, dict) and data.keys() == {"recipients"}:
            items = data["recipients"]
        else:
            raise ValidationError('send {"recipients": [...]}', {"field": "recipients"})
        yield spec, intake.json_rows(items, raw), hashlib.sha256(raw).digest() if digest else None
        return
    if kind not in _STREAMED:
        raise _unsupported(kind)
    upload = await body.spool(request, settings, digest=digest)
    try:
        blocks = upload.blocks()
        rows = intake.csv_rows(blocks) if kind == "text/csv" else intake.ndjson_rows(blocks)
        if fields:
            found = intake.fields_from_query(request.query)
            if kind != "text/csv":
                header, rows = await intake.split_ndjson_header(rows)
                found |= header or {}
            spec = await asyncio.to_thread(intake.parse_batch_fields, found, allow_recipients=False)
        yield spec, rows, upload.digest
    finally:
        upload.close()


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
