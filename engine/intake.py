"""Creating a batch: validate, COPY the recipients, queue one NATS message per chunk.

The same path serves REST (JSON body, streamed NDJSON or CSV) and NATS intake. Recipients
stream through: bytes are split into rows, each row is validated and handed to PostgreSQL's
COPY inside one transaction, so a 1,000,000-recipient upload never sits in memory and a bad
row anywhere rolls back everything (nothing half-created). Bad rows are all reported,
up to ``MAX_REPORTED_ERRORS``, by their 1-based recipient number.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import logging
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from engine.adapters import AVAILABLE, CHUNK_SIZES
from engine.errors import BadRequest, Conflict, NotFound, PayloadTooLarge, ValidationError
from engine.services import Services
from engine.templates import BatchTemplate

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 100
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@"
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)
_BATCH_FIELDS = {
    "name", "from_email", "from_name", "subject", "html", "text", "provider",
    "scheduled_at", "dry_run", "metadata", "draft", "recipients",
}  # fmt: skip
_PUBLISH_WINDOW = 512


def valid_email(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 254 and _EMAIL.fullmatch(value) is not None


@dataclass(slots=True)
class BatchSpec:
    """The batch fields of a create request, validated."""

    name: str
    from_email: str
    from_name: str | None
    subject: str
    html: str | None
    text: str | None
    provider: str
    scheduled_at: datetime | None = None
    dry_run: bool = False
    draft: bool = False
    metadata: dict[str, Any] | None = None
    template: BatchTemplate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.template = BatchTemplate(self.subject, self.html, self.text)


@dataclass(frozen=True, slots=True)
class Created:
    id: str
    status: str
    total_recipients: int
    suppressed: int
    replayed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "total_recipients": self.total_recipients,
            "suppressed": self.suppressed,
        }


def _as_bool(name: str, value: Any, errors: list[dict[str, Any]]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    errors.append({"field": name, "message": "must be true or false"})
    return False


def parse_batch_fields(data: Any, *, allow_recipients: bool = True) -> BatchSpec:
    """Validate the batch fields (JSON body, NDJSON header line or query parameters)."""
    if not isinstance(data, Mapping):
        raise ValidationError("the request body must be a JSON object", code="invalid_body")
    errors: list[dict[str, Any]] = []
    allowed = _BATCH_FIELDS if allow_recipients else _BATCH_FIELDS - {"recipients"}
    for unknown in sorted(set(data) - allowed):
        errors.append({"field": unknown, "message": "unknown field"})

    def text(name: str, *, required: bool, max_len: int) -> str | None:
        value = data.get(name)
        if value is None:
            if required:
                errors.append({"field": name, "message": "is required"})
            return None
        if not isinstance(value, str):
            errors.append({"field": name, "message": "must be a string"})
            return None
        if required and not value.strip():
            errors.append({"field": name, "message": "must not be empty"})
        if len(value) > max_len:
            errors.append({"field": name, "message": f"must be at most {max_len} characters"})
        return value

    name = text("name", required=True, max_len=200)
    from_email = text("from_email", required=True, max_len=254)
    if from_email is not None and not valid_email(from_email):
        errors.append({"field": "from_email", "message": "is not a valid e-mail address"})
    from_name = text("from_name", required=False, max_len=200)
    subject = text("subject", required=True, max_len=998)
    html = text("html", required=False, max_len=2 << 20)
    body_text = text("text", required=False, max_len=2 << 20)
    if html is None and body_text is None and "html" not in data and "text" not in data:
        errors.append({"field": "html", "message": "html or text (or both) is required"})
    provider = text("provider", required=True, max_len=32)
    if provider is not None and provider not in CHUNK_SIZES:
        errors.append(
            {"field": "provider", "message": f"unknown provider; one of {', '.join(CHUNK_SIZES)}"}
        )
    elif provider is not None and provider not in AVAILABLE:
        errors.append(
            {
                "field": "provider",
                "message": f"not available on this server; one of {', '.join(AVAILABLE)}",
            }
        )
    scheduled_at = None
    raw_when = data.get("scheduled_at")
    if raw_when is not None:
        try:
            scheduled_at = datetime.fromisoformat(str(raw_when).replace("Z", "+00:00"))
            if scheduled_at.tzinfo is None:
                scheduled_at = scheduled_at.replace(tzinfo=UTC)
        except ValueError:
            errors.append({"field": "scheduled_at", "message": "must be an ISO 8601 date-time"})
    dry_run = _as_bool("dry_run", data.get("dry_run", False), errors)
    draft = _as_bool("draft", data.get("draft", False), errors)
    metadata = data.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            metadata = ()
    if metadata is not None and not isinstance(metadata, dict):
        errors.append({"field": "metadata", "message": "must be a JSON object"})
    if errors:
        raise ValidationError(_summary(errors), {"errors": errors})
    return BatchSpec(
        name=name or "",
        from_email=from_email or "",
        from_name=from_name,
        subject=subject or "",
        html=html,
        text=body_text,
        provider=provider or "",
        scheduled_at=scheduled_at,
        dry_run=dry_run,
        draft=draft,
        metadata=metadata,
    )


def _summary(errors: list[dict[str, Any]], invalid_rows: int = 0) -> str:
    first = errors[0]
    where = f"recipient {first['row']}" if "row" in first else first.get("field", "body")
    field_name = f" {first['field']}" if "row" in first and "field" in first else ""
    more = len(errors) - 1 if not invalid_rows else invalid_rows - 1
    tail = f" (and {more} more)" if more > 0 else ""
    return f"{where}{field_name}: {first['message']}{tail}"


# --- recipient sources -------------------------------------------------------------


async def _lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[bytes]]:
    """Split a byte stream into lists of complete lines (many at a time, for speed)."""
    rest = b""
    async for chunk in chunks:
        if not chunk:
            continue
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        if lines:
            yield lines
    if rest.strip():
        yield [rest]


async def ndjson_rows(chunks: AsyncIterable[bytes]) -> AsyncIterator[Any]:
    """Rows of an NDJSON stream. A line that is not JSON yields a ``BadRow``."""
    async for lines in _lines(chunks):
        for line in lines:
            if not line.strip():
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                yield BadRow("not valid JSON")


async def csv_rows(chunks: AsyncIterable[bytes]) -> AsyncIterator[Any]:
    """Rows of a CSV stream with a header line: ``email``, ``name``, other columns = vars."""
    header: list[str] | None = None
    open_record = ""  # a record whose quoted field goes on over a line break
    async for lines in _lines(chunks):
        try:
            decoded = [line.decode("utf-8").rstrip("\r") for line in lines]
        except UnicodeDecodeError:
            raise BadRequest("the CSV body is not UTF-8", code="invalid_csv") from None
        records = []
        for line in decoded:
            if open_record:
                line = open_record + "\n" + line
            if line.count('"') % 2:
                open_record = line
                continue
            open_record = ""
            records.append(line)
        for values in csv.reader(records):
            if not values or values == [""]:
                continue
            if header is None:
                header = [h.strip() for h in values]
                if "email" not in header:
                    raise ValidationError(
                        "the CSV header line must have an 'email' column", code="invalid_csv"
                    )
                email_at = header.index("email")
                name_at = header.index("name") if "name" in header else -1
                var_cols = [(i, h) for i, h in enumerate(header) if i not in (email_at, name_at)]
                continue
            if len(values) != len(header):
                yield BadRow(f"has {len(values)} columns, the header has {len(header)}")
                continue
            yield {
                "email": values[email_at],
                "name": values[name_at] if name_at >= 0 and values[name_at] else None,
                "vars": {h: values[i] for i, h in var_cols} if var_cols else None,
            }


async def list_rows(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row the decoder could not read at all."""

    message: str


class _RecipientCopier:
    """Validates rows and turns them into COPY records; remembers the bad ones."""

    def __init__(self, batch_id: uuid.UUID, template: BatchTemplate, status: str, limit: int):
        self.batch_id = batch_id
        self.template = template
        self.status = status
        self.limit = limit
        self.count = 0
        self.invalid = 0
        self.errors: list[dict[str, Any]] = []

    def _bad(self, row: int, field_name: str, message: str) -> None:
        self.invalid += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"row": row, "field": field_name, "message": message})

    def _check(self, row: int, item: Any) -> tuple[str, str | None, Any] | None:
        if isinstance(item, BadRow):
            self._bad(row, "row", item.message)
            return None
        if not isinstance(item, dict):
            self._bad(row, "row", "must be an object with an email")
            return None
        email = item.get("email")
        if not valid_email(email):
            self._bad(row, "email", "is not a valid e-mail address")
            return None
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            self._bad(row, "name", "must be a string")
            return None
        vars_ = item.get("vars")
        if vars_ is not None and not isinstance(vars_, dict):
            self._bad(row, "vars", "must be an object")
            return None
        missing = self.template.missing(vars_)
        if missing:
            self._bad(row, "vars", f"unknown template variable(s): {', '.join(missing)}")
            return None
        extra = set(item) - {"email", "name", "vars"}
        if extra:
            self._bad(row, sorted(extra)[0], "unknown field")
            return None
        return email.strip(), name, vars_ or None

    async def records(self, rows: AsyncIterable[Any]) -> AsyncIterator[tuple]:
        async for item in rows:
            self.count += 1
            if self.count > self.limit:
                raise PayloadTooLarge(
                    f"a batch may have at most {self.limit} recipients",
                    {"max_recipients": self.limit},
                )
            checked = self._check(self.count, item)
            if checked is not None and not self.invalid:
                yield (self.batch_id, self.count, *checked, self.status)
        if self.invalid:
            raise ValidationError(
                _summary(self.errors, self.invalid),
                {"errors": self.errors, "invalid_rows": self.invalid},
                code="invalid_recipients",
            )


# --- creating --------------------------------------------------------------------------


def _initial_status(spec: BatchSpec) -> str:
    if spec.draft:
        return "draft"
    if spec.scheduled_at is not None and spec.scheduled_at > datetime.now(UTC):
        return "scheduled"
    return "queued"


async def _existing(
    conn: asyncpg.Connection, tenant_id: str, column: str, value: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT id, status, total_recipients, suppressed_count, request_hash"
        f" FROM batches WHERE tenant_id = $1 AND {column} = $2",
        tenant_id,
        value,
    )


def _replay(row: asyncpg.Record) -> Created:
    return Created(
        str(row["id"]), row["status"], row["total_recipients"], row["suppressed_count"], True
    )


async def create_batch(
    services: Services,
    tenant_id: str,
    spec: BatchSpec,
    rows: AsyncIterable[Any],
    *,
    external_id: str | None = None,
    idempotency_key: str | None = None,
    request_hash: bytes | None = None,
) -> Created:
    """Store a batch and its recipients in one transaction, then queue its chunks.

    ``external_id`` (a NATS ``Nats-Msg-Id``) and ``idempotency_key`` make a repeated create
    return the first batch instead of a second one.
    """
    batch_id = uuid.uuid4()
    status = _initial_status(spec)
    chunk_size = CHUNK_SIZES[spec.provider]
    copier = _RecipientCopier(
        batch_id,
        spec.template,
        "queued" if status == "queued" else "pending",
        services.settings.max_recipients,
    )
    async with services.pool.acquire() as conn:
        for column, value in (("external_id", external_id), ("idempotency_key", idempotency_key)):
            if value is None:
                continue
            found = await _existing(conn, tenant_id, column, value)
            if found is not None:
                if column == "idempotency_key" and found["request_hash"] != request_hash:
                    raise Conflict(
                        "this Idempotency-Key was used with a different request",
                        {"batch_id": str(found["id"])},
                        code="idempotency_conflict",
                    )
                return _replay(found)
        try:
            async with conn.transaction():
                await conn.execute(
                    """INSERT INTO batches (id, tenant_id, name, from_email, from_name, subject,
                           html, text, provider, status, chunk_size, dry_run, metadata,
                           scheduled_at, external_id, idempotency_key, request_hash)
                       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'creating', $10, $11, $12,
                               $13, $14, $15, $16)""",
                    batch_id, tenant_id, spec.name, spec.from_email, spec.from_name,
                    spec.subject, spec.html, spec.text, spec.provider, chunk_size,
                    spec.dry_run, spec.metadata, spec.scheduled_at, external_id,
                    idempotency_key, request_hash,
                )  # fmt: skip
                await conn.copy_records_to_table(
                    "recipients",
                    records=copier.records(rows),
                    columns=["batch_id", "seq", "email", "name", "vars", "status"],
                )
                total = copier.count
                if total == 0 and not spec.draft:
                    raise ValidationError(
                        "recipients: must not be empty", {"field": "recipients"},
                        code="no_recipients",
                    )  # fmt: skip
                suppressed = await _suppress(conn, batch_id, tenant_id)
                final_status = status
                if status == "queued" and suppressed == total:
                    final_status = "completed"
                await conn.execute(
                    """UPDATE batches SET status = $2, total_recipients = $3,
                           suppressed_count = $4, final_count = $4,
                           completed_at = CASE WHEN $2 = 'completed' THEN now() END
                       WHERE id = $1""",
                    batch_id, final_status, total, suppressed,
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            # A concurrent create with the same external id / idempotency key won the race.
            for column, value in (
                ("external_id", external_id),
                ("idempotency_key", idempotency_key),
            ):
                if value is not None and (found := await _existing(conn, tenant_id, column, value)):
                    return _replay(found)
            raise
    log.info(
        "batch created",
        extra={"batch_id": str(batch_id), "tenant_id": tenant_id, "recipients": total},
    )
    if final_status == "queued":
        await queue_chunks(services, batch_id, spec.provider, tenant_id, total, chunk_size)
    return Created(str(batch_id), final_status, total, suppressed)


async def _suppress(conn: asyncpg.Connection, batch_id: uuid.UUID, tenant_id: str) -> int:
    """Mark recipients on the tenant's suppression list ``suppressed``; return how many."""
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM suppressions WHERE tenant_id = $1)", tenant_id
    ):
        return 0
    result = await conn.execute(
        """UPDATE recipients r SET status = 'suppressed', error = s.reason, updated_at = now()
           FROM suppressions s
           WHERE r.batch_id = $1 AND s.tenant_id = $2 AND s.email = lower(r.email)""",
        batch_id, tenant_id,
    )  # fmt: skip
    return int(result.split()[-1])


async def queue_chunks(
    services: Services,
    batch_id: uuid.UUID,
    provider: str,
    tenant_id: str,
    total: int,
    chunk_size: int,
) -> int:
    """Publish one message per chunk of ``chunk_size`` recipients; mark the batch queued.

    Message ids (``batch:first_seq``) let JetStream drop a chunk published twice when
    queuing is retried after a crash.
    """
    subject = services.topology.send_subject(provider)
    pending: list[asyncio.Future] = []
    count = 0
    for first in range(1, total + 1, chunk_size):
        body = orjson.dumps(
            {"b": str(batch_id), "t": tenant_id, "p": provider, "f": first,
             "n": min(chunk_size, total - first + 1)}
        )  # fmt: skip
        pending.append(
            await services.js.publish_async(
                subject, body, headers={"Nats-Msg-Id": f"{batch_id}:{first}"}
            )
        )
        count += 1
        if len(pending) >= _PUBLISH_WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await services.pool.execute("UPDATE batches SET queued_at = now() WHERE id = $1", batch_id)
    return count


def request_digest(*parts: bytes) -> bytes:
    """What an Idempotency-Key is bound to: the request's parameters and body."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


async def create_from_nats(services: Services, subject: str, data: bytes, msg_id: str) -> Created:
    """A batch published to ``{prefix}.intake.{tenant}``: recorded once per ``msg_id``.

    Raises ``ValidationError``/``BadRequest``/``NotFound`` for a message that can never
    succeed (the caller dead-letters it); other errors are worth a retry.
    """
    tenant_id = subject.rsplit(".", 1)[-1]
    if not await services.pool.fetchval("SELECT 1 FROM tenants WHERE id = $1", tenant_id):
        raise NotFound(
            f"unknown tenant {tenant_id!r} in subject {subject!r}", code="unknown_tenant"
        )
    spec, rows = parse_json_request(data)
    return await create_batch(services, tenant_id, spec, rows, external_id=msg_id)


def parse_json_request(data: bytes) -> tuple[BatchSpec, AsyncIterator[Any]]:
    """A whole create request as JSON (REST body or NATS message): fields and recipients."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    spec = parse_batch_fields(body)
    recipients = body.get("recipients", [] if spec.draft else None)
    if not isinstance(recipients, list):
        raise ValidationError("recipients: must be a list", {"field": "recipients"})
    return spec, list_rows(recipients)


async def split_ndjson_header(
    rows: AsyncIterator[Any],
) -> tuple[dict[str, Any] | None, AsyncIterator[Any]]:
    """An NDJSON upload may start with one line of batch fields (an object without ``email``)."""
    try:
        first = await anext(rows)
    except StopAsyncIteration:
        return None, list_rows([])
    if isinstance(first, dict) and "email" not in first:
        return first, rows

    async def rejoined() -> AsyncIterator[Any]:
        yield first
        async for row in rows:
            yield row

    return None, rejoined()
