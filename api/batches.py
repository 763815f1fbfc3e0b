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

from api import body, context
from engine import batches, control
from engine.errors import UnsupportedMediaType, ValidationError
from engine.intake import decoders, fields, store
from engine.services import Services
from engine.uploads import upload_slot

Handler = Callable[[web.Request], Awaitable[web.Response]]

_JSON = ("application/json", "application/octet-stream", "")
_STREAMED = ("application/x-ndjson", "application/jsonl", "text/csv")
# An Idempotency-Key: visible ASCII (the IETF draft's structured string), 1 to 255 long.
_KEY = re.compile(r"[!-~]{1,255}")


async def create(request: web.Request) -> web.Response:
    services, tenant = request.app[context.SERVICES], request[context.TENANT]
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY.fullmatch(key):
        raise ValidationError(
            "Idempotency-Key: 1 to 255 visible ASCII characters", {"header": "Idempotency-Key"}
        )
    bound = key is not None
    async with upload_slot(services, tenant), _received(request, True, bound) as received:
        spec, rows, body_digest = received
        digest = None  # what the key is bound to: content type, query string, whole body
        if body_digest is not None:
            digest = store.request_digest(
                request.content_type.encode(), request.query_string.encode(), body_digest
            )
        created = await store.create_batch(
            services, tenant, spec, rows, idempotency_key=key, request_hash=digest
        )
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    return context.json_response(created.as_dict(), status=201, headers=headers)


async def append(request: web.Request) -> web.Response:
    """More recipients for a draft: JSON (``{"recipients": [...]}``), NDJSON or CSV."""
    services, tenant = request.app[context.SERVICES], request[context.TENANT]
    async with upload_slot(services, tenant), _received(request, False, False) as received:
        _, rows, _ = received
        added = await store.append_recipients(services, tenant, request.match_info["id"], rows)
    return context.json_response(added.as_dict())


@contextlib.asynccontextmanager
async def _received(
    request: web.Request, with_fields: bool, digest: bool
) -> AsyncIterator[tuple[fields.BatchSpec | None, AsyncIterator[list[Any]], bytes | None]]:
    """The whole body received (``api.body``), then: the batch fields (``with_fields``: from the
    JSON body, the NDJSON header line or the query), its rows, and (``digest``) the
    body's sha256."""
    settings, kind = request.app[context.SETTINGS], request.content_type
    spec = None
    if kind in _JSON:
        data, raw = await body.read_json(request, settings)
        if with_fields:  # validating compiles the templates: off the event loop
            if request.query:
                raise ValidationError(
                    "batch fields go in the JSON body (query parameters are for CSV and NDJSON)",
                    {"field": next(iter(request.query))},
                )
            spec = await asyncio.to_thread(fields.parse_batch_fields, data)
            items = data.get("recipients", [] if spec.draft else None)
        elif isinstance(data, dict) and data.keys() == {"recipients"}:
            items = data["recipients"]
        else:
            raise ValidationError('send {"recipients": [...]}', {"field": "recipients"})
        yield spec, decoders.json_rows(items, raw), hashlib.sha256(raw).digest() if digest else None
        return
    if kind not in _STREAMED:
        raise _unsupported(kind)
    upload = await body.spool(request, settings, digest=digest)
    try:
        blocks = upload.blocks()
        rows = decoders.csv_rows(blocks) if kind == "text/csv" else decoders.ndjson_rows(blocks)
        if with_fields:
            found = fields.fields_from_query(request.query)
            if kind != "text/csv":
                header, rows = await decoders.split_ndjson_header(rows)
                found |= header or {}
            spec = await asyncio.to_thread(fields.parse_batch_fields, found, allow_recipients=False)
        yield spec, rows, upload.digest
    finally:
        upload.close()


def _unsupported(kind: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"unsupported Content-Type {kind!r}: use application/json, application/x-ndjson or text/csv"
    )


async def index(request: web.Request) -> web.Response:
    result = await batches.list_batches(
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        status=request.query.get("status"),
        external_id=request.query.get("external_id"),
        limit=context.query_int(request, "limit"),
        cursor=request.query.get("cursor"),
    )
    return context.json_response(result)


async def show(request: web.Request) -> web.Response:
    result = await batches.get_batch(
        request.app[context.SERVICES].pool, request[context.TENANT], request.match_info["id"]
    )
    return context.json_response(result)


async def recipients(request: web.Request) -> web.Response:
    result = await batches.list_recipients(
        request.app[context.SERVICES].pool,
        request[context.TENANT],
        request.match_info["id"],
        status=request.query.get("status"),
        limit=context.query_int(request, "limit"),
        cursor=request.query.get("cursor"),
    )
    return context.json_response(result)


def _control(action: Callable[[Services, str, str], Awaitable[dict[str, Any]]]) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        services, tenant = request.app[context.SERVICES], request[context.TENANT]
        return context.json_response(await action(services, tenant, request.match_info["id"]))

    return handler


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/batches", create)
    app.router.add_get("/api/batches", index)
    app.router.add_get("/api/batches/{id}", show)
    app.router.add_get("/api/batches/{id}/recipients", recipients)
    app.router.add_post("/api/batches/{id}/recipients", append)
    for name, action in (
        ("pause", control.pause),
        ("resume", control.resume),
        ("cancel", control.cancel),
        ("send", control.send),
    ):
        app.router.add_post(f"/api/batches/{{id}}/{name}", _control(action))
