"""A new batch from a form: fields, where it sends from, schedule, dry run, draft, and its
recipients as a CSV file (or CSV pasted), with a preview of the first messages.

The form becomes exactly what ``POST /api/batches`` with a CSV body makes of its query
parameters and body: ``engine.intake.fields.parse_batch_fields`` for the fields,
``engine.intake.decoders.csv_rows`` for the rows, ``engine.intake.store.create_batch`` in
one of the tenant's upload slots (``engine.uploads``). Its errors are the API's, shown
next to the field they name or as the CSV rows they name. The upload is streamed from the
multipart body into a spool file (memory first, disk past 8 MiB, at most
``MAX_UPLOAD_BYTES``) before anything is parsed, as the API does. The preview renders the
first recipients with the batch's template (``engine.templates.BatchTemplate``).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

from aiohttp import BodyPartReader, web

from engine import accounts
from engine.errors import BadRequest, BatchSenderError, PayloadTooLarge, ValidationError
from engine.intake import decoders, fields, store
from engine.templates import BatchTemplate
from engine.uploads import upload_slot
from providers.registry import PROVIDERS
from web import context, csrf, render

BLOCK = 256 << 10
SPOOL_MEMORY = 8 << 20
TEXT_FIELD_BYTES = 4 << 20  # html and text are at most 2 MiB each (engine.intake.fields)
PREVIEW_ROWS = 3
TEXT_FIELDS = ("name", "from_email", "from_name", "subject", "html", "text", "scheduled_at")
# Which form control an error of the API's field names is shown next to.
CONTROL_OF = {"provider": "send_through", "provider_account": "send_through", "recipients": "csv"}
EXAMPLE = {"email": "ada@example.com", "name": "Ada Lovelace", "vars": None}


@dataclass
class Submitted:
    values: dict[str, str] = field(default_factory=dict)
    csv: IO[bytes] | None = None
    csv_name: str | None = None

    async def blocks(self) -> AsyncIterator[bytes]:
        if self.csv is not None:
            self.csv.seek(0)
            while block := self.csv.read(BLOCK):
                yield block
        elif self.values.get("csv_text", "").strip():
            yield self.values["csv_text"].encode()

    @property
    def has_recipients(self) -> bool:
        return self.csv is not None or bool(self.values.get("csv_text", "").strip())

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()


async def _read_part(part: BodyPartReader, limit: int, sink: IO[bytes] | None = None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(BLOCK):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{part.name}: larger than {limit} bytes", {"field": part.name})
        if sink is not None:
            sink.write(chunk)
        else:
            chunks.append(chunk)
    return b"".join(chunks)


async def read_form(request: web.Request) -> Submitted:
    """The multipart form (its CSRF token checked first), the CSV spooled."""
    reader = await csrf.multipart(request)
    submitted = Submitted()
    settings = request.app[context.SETTINGS]
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                continue
            if part.name == "csv_file":
                if not part.filename:
                    await part.release()
                    continue
                spool = tempfile.SpooledTemporaryFile(SPOOL_MEMORY, dir=settings.upload_dir or None)
                submitted.csv = spool
                await _read_part(part, settings.max_upload_bytes, spool)
                if spool.tell() == 0:  # an empty file chosen: as if none
                    spool.close()
                    submitted.csv = None
                else:
                    submitted.csv_name = part.filename
            else:
                raw = await _read_part(part, TEXT_FIELD_BYTES)
                submitted.values[part.name] = raw.decode("utf-8", errors="replace")
    except BaseException:
        submitted.close()
        raise
    return submitted


def batch_fields(values: dict[str, str]) -> dict[str, Any]:
    """The form's values as the batch fields of a create request (empty ones left out)."""
    data: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = values.get(name, "")
        if value.strip():
            data[name] = value.strip() if name not in ("html", "text") else value
    through = values.get("send_through", "")
    kind, _, ref = through.partition(":")
    if kind == "provider" and ref:
        data["provider"] = ref
    elif kind == "account" and ref:
        data["provider_account"] = ref
    data["dry_run"] = values.get("dry_run") == "on"
    data["draft"] = values.get("draft") == "on"
    return data


async def _choices(request: web.Request) -> dict[str, Any]:
    """Where a batch can send from: the server's default accounts and the tenant's own."""
    settings = request.app[context.SETTINGS]
    own = await accounts.list_accounts(context.services(request).pool, context.tenant(request))
    return {
        "server_providers": [p for p in PROVIDERS if settings.provider_enabled(p)],
        "own_accounts": own["data"],
    }


def _errors(exc: BatchSenderError) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    found, rows = render.field_errors(exc)
    controls: dict[str, list[str]] = {}
    for name, messages in found.items():
        controls.setdefault(CONTROL_OF.get(name, name), []).extend(messages)
    if not controls and not rows and exc.code in ("invalid_csv", "line_too_long", "no_recipients"):
        controls["csv"] = [exc.message]
    return controls, rows


async def form_page(request: web.Request) -> web.Response:
    return await render.page(
        request,
        "batches/new.html",
        active="new",
        title="New batch",
        values={"send_through": "", "dry_run": "", "draft": ""},
        errors={},
        row_errors=[],
        problem=None,
        **await _choices(request),
    )


async def create(request: web.Request) -> web.Response:
    submitted = await read_form(request)
    services, tenant = context.services(request), context.tenant(request)
    try:
        spec = await asyncio.to_thread(
            fields.parse_batch_fields, batch_fields(submitted.values), allow_recipients=False
        )
        async with upload_slot(services, tenant):
            created = await store.create_batch(
                services, tenant, spec, decoders.csv_rows(submitted.blocks())
            )
    except BatchSenderError as exc:
        errors, rows = _errors(exc)
        values = {k: v for k, v in submitted.values.items() if k != csrf.FIELD}
        return await render.page(
            request,
            "batches/new.html",
            active="new",
            title="New batch",
            status=exc.status,
            values={"send_through": "", "dry_run": "", "draft": "", **values},
            errors=errors,
            row_errors=rows,
            problem=exc.message,
            csv_name=submitted.csv_name,
            **await _choices(request),
        )
    finally:
        submitted.close()
    text = f"Batch created: {created.total_recipients:,} recipients, {created.status}"
    if created.suppressed:
        text += f" ({created.suppressed:,} suppressed)"
    return await render.flash_redirect(request, f"/batches/{created.id}", text + ".")


async def _first_rows(submitted: Submitted) -> list[Any]:
    rows: list[Any] = []
    async for block in decoders.csv_rows(submitted.blocks()):
        rows.extend(block)
        if len(rows) >= PREVIEW_ROWS:
            break
    return rows[:PREVIEW_ROWS]


async def preview(request: web.Request) -> web.Response:
    """The first recipients' messages as the workers would render them (a fragment)."""
    submitted = await read_form(request)
    values = submitted.values
    messages: list[dict[str, Any]] = []
    problem, errors = None, {}
    try:
        if not values.get("subject", "").strip():
            raise ValidationError("subject: is required", {"field": "subject"})
        if not values.get("html", "").strip() and not values.get("text", "").strip():
            raise ValidationError("html: html or text (or both) is required", {"field": "html"})
        template = await asyncio.to_thread(
            BatchTemplate,
            values["subject"],
            values.get("html") if values.get("html", "").strip() else None,
            values.get("text") if values.get("text", "").strip() else None,
        )
        rows = await _first_rows(submitted) if submitted.has_recipients else []
        example = not rows
        for number, row in enumerate(rows or [EXAMPLE], 1):
            messages.append(_rendered(template, number, row))
    except (ValidationError, BadRequest) as exc:
        problem = exc.message
        errors, _ = _errors(exc)
        example = False
    finally:
        submitted.close()
    return await render.page(
        request,
        "batches/_preview.html",
        messages=messages,
        example=example,
        problem=problem,
        errors=errors,
    )


def _rendered(template: BatchTemplate, number: int, row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        message = row.message if isinstance(row, decoders.BadRow) else "not a recipient"
        return {"row": number, "email": None, "error": message}
    email, name, vars_ = row.get("email"), row.get("name"), row.get("vars")
    if not fields.valid_email(email):
        return {"row": number, "email": email, "error": "email: is not a valid e-mail address"}
    missing = template.missing(vars_)
    if missing:
        return {
            "row": number,
            "email": email,
            "error": f"vars: unknown template variable(s): {', '.join(missing)}",
        }
    try:
        rendered = template.render(email, name, vars_)
    except Exception as exc:  # what the template raises for this recipient
        return {"row": number, "email": email, "error": f"the template fails: {exc}"[:300]}
    return {
        "row": number,
        "email": email,
        "name": name,
        "subject": rendered.subject,
        "html": rendered.html,
        "text": rendered.text,
        "error": None,
    }


def add_routes(app: web.Application) -> None:
    app.router.add_get("/batches/new", form_page)
    app.router.add_post("/batches/new", create)
    app.router.add_post("/batches/preview", preview)
