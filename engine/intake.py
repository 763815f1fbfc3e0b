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
import io
import logging
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from asyncpg.pgproto.pgproto import UUID as PgUUID

from engine import tenants
from engine.adapters import AVAILABLE, CHUNK_SIZES
from engine.batches import batch_uuid
from engine.cells import cells_of
from engine.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    ValidationError,
)
from engine.services import Services
from engine.templates import BatchTemplate
from engine.tenants import Limits

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


# The longest value of each text field (the OpenAPI document states the same).
FIELD_LIMITS = {"name": 200, "from_email": 254, "from_name": 200, "subject": 998,
                "html": 2 << 20, "text": 2 << 20, "provider": 32}  # fmt: skip
REQUIRED_FIELDS = ("name", "from_email", "subject", "provider")
# ISO 8601 as clients write it: a date and a time, seconds and an offset optional.
SCHEDULED_AT = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?([Zz]|[+-]\d{2}:\d{2})?$"
_SCHEDULED_AT = re.compile(SCHEDULED_AT)


def _as_bool(name: str, value: Any, errors: list[dict[str, Any]]) -> bool:
    if isinstance(value, bool):
        return value
    errors.append({"field": name, "message": "must be true or false"})
    return False


def fields_from_query(query: Mapping[str, str]) -> dict[str, Any]:
    """Batch fields given as query parameters (streamed bodies), typed as in JSON:
    ``dry_run``/``draft`` from true/false/1/0, ``metadata`` from its JSON text."""
    fields: dict[str, Any] = dict(query)
    for name in ("dry_run", "draft"):
        if name in fields and fields[name].lower() in ("true", "false", "1", "0"):
            fields[name] = fields[name].lower() in ("true", "1")
    if "metadata" in fields:
        try:
            fields["metadata"] = orjson.loads(fields["metadata"])
        except orjson.JSONDecodeError:
            pass  # left as text: "must be a JSON object"
    return fields


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
        if "\x00" in value:
            errors.append({"field": name, "message": "must not contain NUL characters"})
        if required and not value.strip():
            errors.append({"field": name, "message": "must not be empty"})
        if len(value) > max_len:
            errors.append({"field": name, "message": f"must be at most {max_len} characters"})
        return value

    def field(name: str) -> str | None:
        return text(name, required=name in REQUIRED_FIELDS, max_len=FIELD_LIMITS[name])

    name = field("name")
    from_email = field("from_email")
    if from_email is not None and not valid_email(from_email):
        errors.append({"field": "from_email", "message": "is not a valid e-mail address"})
    from_name = field("from_name")
    subject = field("subject")
    html = field("html")
    body_text = field("text")
    if html is None and body_text is None:
        errors.append({"field": "html", "message": "html or text (or both) is required"})
    provider = field("provider")
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
    scheduled_at = _scheduled_at(data.get("scheduled_at"), errors)
    dry_run = _as_bool("dry_run", data.get("dry_run", False), errors)
    draft = _as_bool("draft", data.get("draft", False), errors)
    metadata = _metadata(data.get("metadata"), errors)
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


MAX_METADATA_BYTES = 16 << 10
MAX_METADATA_DEPTH = 16


def _scheduled_at(raw: Any, errors: list[dict[str, Any]]) -> datetime | None:
    """An ISO 8601 date-time (UTC when it has no offset) that exists in UTC too."""
    if raw is None:
        return None
    try:
        if not isinstance(raw, str) or not _SCHEDULED_AT.fullmatch(raw):
            raise ValueError("not ISO 8601")
        when = datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        when.astimezone(UTC)  # OverflowError for year 1 or 9999 with an offset
    except (ValueError, OverflowError):
        errors.append({"field": "scheduled_at", "message": "must be an ISO 8601 date-time"})
        return None
    return when


def _depth(value: Any) -> int:
    """How deeply a decoded JSON value nests (iteratively: it may nest 1,000 deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend(
                (v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


def _metadata(raw: Any, errors: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A JSON object of bounded size and depth."""
    metadata = raw
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        errors.append({"field": "metadata", "message": "must be a JSON object"})
    elif _depth(metadata) > MAX_METADATA_DEPTH:
        errors.append(
            {"field": "metadata", "message": f"must nest at most {MAX_METADATA_DEPTH} levels"}
        )
    elif _has_nul(metadata):
        errors.append({"field": "metadata", "message": "must not contain NUL characters"})
    elif len(orjson.dumps(metadata)) > MAX_METADATA_BYTES:
        errors.append(
            {"field": "metadata", "message": f"must be at most {MAX_METADATA_BYTES} bytes as JSON"}
        )
    else:
        return metadata
    return None


def _summary(errors: list[dict[str, Any]], invalid_rows: int = 0) -> str:
    first = errors[0]
    where = f"recipient {first['row']}" if "row" in first else first.get("field", "body")
    field_name = f" {first['field']}" if "row" in first and "field" in first else ""
    more = len(errors) - 1 if not invalid_rows else invalid_rows - 1
    tail = f" (and {more} more)" if more > 0 else ""
    return f"{where}{field_name}: {first['message']}{tail}"


# --- recipient sources -------------------------------------------------------------


# One NDJSON line or CSV record at most (a recipient is a line; a longer one is an error,
# not a reason to buffer without end).
MAX_LINE_BYTES = 1 << 20
_CSV_FIELD_BYTES = csv.field_size_limit()  # 128 KiB: a CSV field larger than that is an error


async def _text(chunks: AsyncIterable[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    """Re-cut a byte stream at line ends: ``(number of its first line, whole lines without
    the last line break)``, many lines at a time. Linear in the stream's size: the start
    of an unfinished line is kept in pieces, never copied again per chunk."""
    pieces: list[bytes] = []
    pending = 0
    line = 1
    async for chunk in chunks:
        if not chunk:
            continue
        cut = chunk.rfind(b"\n")
        if cut < 0:
            pieces.append(chunk)
            pending += len(chunk)
            if pending > MAX_LINE_BYTES:
                raise BadRequest(
                    f"line {line} is longer than {MAX_LINE_BYTES} bytes (one recipient per line)",
                    {"line": line}, code="line_too_long",
                )  # fmt: skip
            continue
        text = b"".join((*pieces, chunk[:cut])) if pieces else chunk[:cut]
        pieces, pending = [chunk[cut + 1 :]], len(chunk) - cut - 1
        yield line, text
        line += text.count(b"\n") + 1
    rest = b"".join(pieces)
    if rest.strip():
        yield line, rest


def _has_nul(value: Any) -> bool:
    """Whether a decoded JSON value holds a NUL character in any string (PostgreSQL text
    cannot store one). Iterative: JSON may nest deeper than Python's recursion limit."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_NUL_ROW = "contains a NUL character (\\u0000)"


async def ndjson_rows(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[Any]]:
    """Blocks of rows of an NDJSON stream. A line that is not JSON, or that holds a NUL
    character, becomes a ``BadRow``.

    A block of lines is parsed as one JSON array (one orjson call instead of one per line:
    the line breaks become commas); only a block with a bad or blank line is parsed again
    line by line.
    """
    async for _, text in _text(chunks):
        block = None
        try:
            parsed = orjson.loads(b"[" + text.replace(b"\n", b",") + b"]")
            if len(parsed) == text.count(b"\n") + 1:  # one value per line
                block = parsed
        except orjson.JSONDecodeError:
            pass
        if block is None:
            block = [_loads_or_bad(line) for line in text.split(b"\n") if line.strip()]
        if b"\\u0000" in text:  # rare: find the rows
            block = [BadRow(_NUL_ROW) if _has_nul(row) else row for row in block]
        if block:
            yield block


def _loads_or_bad(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return BadRow("not valid JSON")


def _csv_error(line: int, message: str) -> BadRequest:
    return BadRequest(f"CSV line {line}: {message}", {"line": line}, code="invalid_csv")


async def csv_rows(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[Any]]:
    """Blocks of rows of a CSV stream (RFC 4180) with a header line: ``email``, ``name``,
    other columns become vars. A quoted field may go on over line breaks.

    Every record becomes one row or one error, so the rows accepted are the rows sent:
    malformed quoting, a field over 128 KiB, a NUL character, a quoted field that is never
    closed, or bytes that are not UTF-8 are a ``BadRequest`` naming the line. Parsing is
    linear: each block is read once by the csv module (strict mode); only a record whose
    quoted field goes on past the block is carried over, and it is at most 128 KiB.
    """
    header: list[str] | None = None
    carry, carry_line = "", 0  # a record whose quoted field goes on in the next block
    async for first_line, data in _text(chunks):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = first_line + data.count(b"\n", 0, exc.start)
            raise _csv_error(line, "not UTF-8") from None
        if "\x00" in text:
            raise _csv_error(
                first_line + text.count("\n", 0, text.index("\x00")), "a NUL character"
            )
        start = first_line
        if carry:
            text, start, carry = carry + "\n" + text, carry_line, ""
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        block: list[Any] = []
        done = 0  # lines taken by complete records
        try:
            for values in reader:
                done = reader.line_num
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
                    var_cols = [
                        (i, h) for i, h in enumerate(header) if i not in (email_at, name_at)
                    ]
                    continue
                if len(values) != len(header):
                    block.append(BadRow(f"has {len(values)} columns, the header has {len(header)}"))
                    continue
                block.append({
                    "email": values[email_at],
                    "name": values[name_at] if name_at >= 0 and values[name_at] else None,
                    "vars": {h: values[i] for i, h in var_cols} if var_cols else None,
                })  # fmt: skip
        except csv.Error as exc:
            line = start + done  # where the record that failed begins
            if str(exc) != "unexpected end of data":
                raise _csv_error(line, str(exc)) from None
            carry = "".join(io.StringIO(text, newline="").readlines()[done:]).removesuffix("\n")
            carry_line = line
            if len(carry) > _CSV_FIELD_BYTES:
                raise _csv_error(
                    line, "a quoted field is not closed (or is over 128 KiB)"
                ) from None
        if block:
            yield block
    if carry:
        raise _csv_error(carry_line, "a quoted field is not closed at the end of the body")


async def list_rows(items: list[Any], block: int = 10_000) -> AsyncIterator[list[Any]]:
    for start in range(0, len(items), block):
        yield items[start : start + block]


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row the decoder could not read at all."""

    message: str


_RECIPIENT_KEYS = frozenset({"email", "name", "vars"})
MAX_NAME_CHARS = 200  # a recipient's name (the fast check in records() says 200 too)
RENDER_CHECK_ROWS = 10  # recipients rendered at intake


class _RecipientCopier:
    """Validates blocks of rows and turns them into COPY records; remembers the bad ones."""

    def __init__(
        self, batch_id: uuid.UUID, template: BatchTemplate, status: str, limits: Limits,
        first: int = 1,
    ) -> None:  # fmt: skip
        self.batch_id = PgUUID(str(batch_id))  # asyncpg's own type: copied without conversion
        self.required = template.required_vars
        self.template = template
        self.status = status
        self.limits = limits
        self.count = first - 1  # rows before this upload (appending to a draft)
        self.to_render = RENDER_CHECK_ROWS
        self.invalid = 0
        self.errors: list[dict[str, Any]] = []

    def _bad(self, row: int, field_name: str, message: str) -> None:
        self.invalid += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"row": row, "field": field_name, "message": message})

    def _check(self, row: int, item: Any) -> None:
        """Note what is wrong with a row that ``records`` did not take."""
        if isinstance(item, BadRow):
            return self._bad(row, "row", item.message)
        if not isinstance(item, dict):
            return self._bad(row, "row", "must be an object with an email")
        if not valid_email(item.get("email")):
            return self._bad(row, "email", "is not a valid e-mail address")
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            return self._bad(row, "name", "must be a string")
        if name is not None and len(name) > MAX_NAME_CHARS:
            return self._bad(row, "name", f"must be at most {MAX_NAME_CHARS} characters")
        vars_ = item.get("vars")
        if vars_ is not None and not isinstance(vars_, dict):
            return self._bad(row, "vars", "must be an object")
        missing = self.template.missing(vars_)
        if missing:
            return self._bad(row, "vars", f"unknown template variable(s): {', '.join(missing)}")
        if not item.keys() <= _RECIPIENT_KEYS:
            return self._bad(row, sorted(item.keys() - _RECIPIENT_KEYS)[0], "unknown field")
        raise AssertionError(f"row {row} is valid; records() should have taken it")

    def records(self, block: list[Any]) -> list[tuple]:
        """COPY records of one block (none once a bad row was seen: it will all roll back).

        The loop is the intake's hot path: one inlined test for a good row; ``_check``
        only runs for a bad one, to name what is wrong with it.
        """
        first = self.count + 1
        self.count += len(block)
        limit = self.limits.max_batch_recipients
        if self.count > limit:
            message = f"a batch may have at most {limit} recipients; split it into several"
            if self.limits.own_recipient_limit:
                raise TooManyRequests(message, {"limit": "max_batch_recipients", "value": limit},
                                      retry_after=3600, code="too_many_recipients")  # fmt: skip
            raise PayloadTooLarge(message, {"max_recipients": limit})
        out = []
        append, match, known = out.append, _EMAIL.fullmatch, _RECIPIENT_KEYS.issuperset
        batch_id, status, required = self.batch_id, self.status, self.required
        for row, item in enumerate(block, first):
            if type(item) is dict:
                email, name, vars_ = item.get("email"), item.get("name"), item.get("vars")
                if (
                    type(email) is str and len(email) <= 254 and match(email) is not None
                    and (name is None or (type(name) is str and len(name) <= 200))
                    and (vars_ is None or type(vars_) is dict)
                    and (not required or (vars_ is not None and required <= vars_.keys()))
                    and known(item)
                ):  # fmt: skip
                    append((batch_id, row, email, name, vars_ or None, status))
                    continue
            self._check(row, item)
        if self.to_render and out:
            self._render_first(out)
        return [] if self.invalid else out

    def _render_first(self, records: list[tuple]) -> None:
        """Render the first recipients now: a template that fails for them (``{{ 1/0 }}``,
        a value of the wrong type, a limit) is named here instead of failing at send time."""
        for record in records[: self.to_render]:
            try:
                self.template.render(record[2], record[3], record[4])
            except Exception as exc:  # whatever the template raises for this recipient
                self._bad(record[1], "template", f"cannot be rendered: {exc}"[:300])
        self.to_render = max(0, self.to_render - len(records))

    def _unstorable(self, records: list[tuple]) -> None:
        """Name the rows of a block PostgreSQL's COPY could not take (vars nested deeper
        than JSON encoding allows)."""
        for record in records:
            try:
                orjson.dumps(record[4])
            except orjson.JSONEncodeError as exc:
                self._bad(record[1], "vars", f"cannot be stored: {exc}")

    def raise_if_invalid(self) -> None:
        if self.invalid:
            raise ValidationError(
                _summary(self.errors, self.invalid),
                {"errors": self.errors, "invalid_rows": self.invalid},
                code="invalid_recipients",
            )

    async def copy(self, conn: asyncpg.Connection, blocks: AsyncIterable[list[Any]]) -> None:
        """Parse and COPY at once: while PostgreSQL takes one block, the next is validated."""
        ready: asyncio.Queue[list[tuple] | None] = asyncio.Queue(maxsize=2)

        async def produce() -> None:
            pending: list[tuple] = []  # records of several blocks: one COPY per ~10,000
            try:
                async for block in blocks:
                    pending += self.records(block)
                    if len(pending) >= COPY_ROWS:
                        await ready.put(pending)
                        pending = []
                    await asyncio.sleep(0)  # a large upload never holds the event loop long
                if pending and not self.invalid:
                    await ready.put(pending)
            finally:
                await ready.put(None)

        producer = asyncio.create_task(produce())
        try:
            while (records := await ready.get()) is not None:
                try:
                    await conn.copy_records_to_table(
                        "recipients", records=records, columns=_COPY_COLUMNS
                    )
                except orjson.JSONEncodeError:
                    self._unstorable(records)
                    break
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        if not producer.cancelled():  # cancelled here only after a block COPY refused
            await producer  # re-raises a parse error (bad encoding, too many recipients)
        self.raise_if_invalid()


_COPY_COLUMNS = ["batch_id", "seq", "email", "name", "vars", "status"]
# Recipients per COPY statement: blocks are parsed a few thousand at a time (the event
# loop stays free), but each COPY has a round trip of its own, so several go in one.
COPY_ROWS = 10_000


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
    if not services.settings.provider_enabled(spec.provider):
        error = {"field": "provider", "message": "not enabled on this server"}
        raise ValidationError(_summary([error]), {"errors": [error]})
    batch_id = uuid.uuid4()
    status = _initial_status(spec)
    chunk_size = CHUNK_SIZES[spec.provider]
    async with services.pool.acquire() as conn:
        tenant_limits = await tenants.limits(conn, tenant_id, services.settings)
        copier = _RecipientCopier(
            batch_id, spec.template, "queued" if status == "queued" else "pending", tenant_limits
        )
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
        await tenants.check_active_batches(conn, tenant_id, tenant_limits)
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
                await copier.copy(conn, rows)
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
                await _add_counts(conn, batch_id, {copier.status: total - suppressed,
                                                   "suppressed": suppressed})  # fmt: skip
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


async def append_recipients(
    services: Services, tenant_id: str, batch_id: str, rows: AsyncIterable[Any]
) -> Created:
    """Add recipients to a draft (numbered after those it has), all or nothing."""
    bid = batch_uuid(batch_id)
    async with services.pool.acquire() as conn, conn.transaction():
        batch = await conn.fetchrow(
            """SELECT status, subject, html, text, total_recipients FROM batches
                WHERE id = $1 AND tenant_id = $2 AND status <> 'creating' FOR UPDATE""",
            bid, tenant_id,
        )  # fmt: skip
        if batch is None:
            raise NotFound(f"batch {batch_id!r} not found")
        if batch["status"] != "draft":
            raise Conflict(f"recipients can only be added to a draft; this batch is "
                           f"{batch['status']}", {"status": batch["status"]},
                           code="invalid_state")  # fmt: skip
        before = batch["total_recipients"]
        template = await asyncio.to_thread(
            BatchTemplate, batch["subject"], batch["html"], batch["text"]
        )
        copier = _RecipientCopier(
            bid, template, "pending",
            await tenants.limits(conn, tenant_id, services.settings), first=before + 1,
        )  # fmt: skip
        await copier.copy(conn, rows)
        added = copier.count - before
        if added == 0:
            raise ValidationError("recipients: must not be empty", {"field": "recipients"},
                                  code="no_recipients")  # fmt: skip
        suppressed = await _suppress(conn, bid, tenant_id)
        total_suppressed = await conn.fetchval(
            """UPDATE batches SET total_recipients = $2, suppressed_count = suppressed_count + $3,
                      final_count = final_count + $3
                WHERE id = $1 RETURNING suppressed_count""",
            bid, copier.count, suppressed,
        )  # fmt: skip
        await _add_counts(conn, bid, {"pending": added - suppressed, "suppressed": suppressed})
    return Created(batch_id, "draft", copier.count, total_suppressed)


async def _add_counts(
    conn: asyncpg.Connection, batch_id: uuid.UUID, counts: dict[str, int]
) -> None:
    """Add to the batch's recipient counts per status (``batch_counts``)."""
    await conn.execute(
        """INSERT INTO batch_counts (batch_id, status, n)
           SELECT $1, status, n FROM unnest($2::text[], $3::int[]) AS c(status, n) WHERE n > 0
           ON CONFLICT (batch_id, status) DO UPDATE SET n = batch_counts.n + excluded.n""",
        batch_id, list(counts), list(counts.values()),
    )  # fmt: skip


async def _suppress(conn: asyncpg.Connection, batch_id: uuid.UUID, tenant_id: str) -> int:
    """Mark recipients on the tenant's suppression list ``suppressed``; return how many."""
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM suppressions WHERE tenant_id = $1)", tenant_id
    ):
        return 0
    result = await conn.execute(
        """UPDATE recipients r SET status = 'suppressed', error = s.reason, updated_at = now()
           FROM suppressions s
           WHERE r.batch_id = $1 AND s.tenant_id = $2 AND s.email = lower(r.email)
             AND r.status IN ('pending', 'queued')""",
        batch_id, tenant_id,
    )  # fmt: skip
    return int(result.split()[-1])


async def start_batch(services: Services, batch_id: uuid.UUID, *, from_status: str) -> str | None:
    """Queue a ``draft`` (its send) or a due ``scheduled`` batch: its recipients become
    ``queued`` (addresses suppressed since it was created are skipped) and its chunks are
    published. Returns the new status, or None when the batch was not in ``from_status``.
    If the process dies before the chunks are out, the leader queues them
    (``engine.recovery``)."""
    async with services.pool.acquire() as conn:
        async with conn.transaction():
            batch = await conn.fetchrow(
                """SELECT tenant_id, provider, chunk_size, total_recipients FROM batches
                    WHERE id = $1 AND status = $2 FOR UPDATE""",
                batch_id, from_status,
            )  # fmt: skip
            if batch is None:
                return None
            await _suppress(conn, batch_id, batch["tenant_id"])
            await conn.execute(
                "UPDATE recipients SET status = 'queued' WHERE batch_id = $1 AND status = 'pending'",
                batch_id,
            )
            await conn.execute("DELETE FROM batch_counts WHERE batch_id = $1", batch_id)
            status = await conn.fetchval(_RECOUNT, batch_id)
    if status == "queued":
        await queue_chunks(services, batch_id, batch["provider"], batch["tenant_id"],
                           batch["total_recipients"], batch["chunk_size"])  # fmt: skip
    return status


# A batch's counts from its recipients (at a start, when nothing is being sent yet).
_RECOUNT = """
WITH c AS (
    SELECT status, count(*)::int AS n FROM recipients WHERE batch_id = $1 GROUP BY status
), counted AS (
    INSERT INTO batch_counts (batch_id, status, n) SELECT $1, status, n FROM c
), s AS (
    SELECT coalesce(sum(n) FILTER (WHERE status = 'suppressed'), 0)::int AS suppressed,
           coalesce(sum(n) FILTER (WHERE status = 'queued'), 0)::int AS queued
      FROM c
)
UPDATE batches b
   SET status = CASE WHEN s.queued = 0 THEN 'completed' ELSE 'queued' END,
       suppressed_count = s.suppressed, final_count = s.suppressed, queued_at = NULL,
       completed_at = CASE WHEN s.queued = 0 THEN now() END
  FROM s WHERE b.id = $1
RETURNING b.status
"""


async def _publish_chunks(
    services: Services, batch_id: uuid.UUID, provider: str, tenant_id: str,
    ranges: Iterable[tuple[int, int]], tag: str = "", generation: int = 0,
) -> int:  # fmt: skip
    """One chunk message per (first seq, count), published with a window of acks.

    Message ids (``batch:first[:tag]``) let JetStream drop a chunk published twice; a
    resume, cancel, replay or recovery publishes under its own tag.
    """
    subject = services.topology.send_subject(provider)
    pending: list[asyncio.Future] = []
    count = 0
    for first, n in ranges:
        chunk = {"b": str(batch_id), "t": tenant_id, "p": provider, "f": first, "n": n}
        if generation:
            chunk["g"] = generation
        msg_id = f"{batch_id}:{first}" + (f":{tag}" if tag else "")
        pending.append(
            await services.js.publish_async(
                subject, orjson.dumps(chunk), headers={"Nats-Msg-Id": msg_id}
            )
        )
        count += 1
        if len(pending) >= _PUBLISH_WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return count


async def queue_chunks(
    services: Services,
    batch_id: uuid.UUID,
    provider: str,
    tenant_id: str,
    total: int,
    chunk_size: int,
) -> int:
    """Publish one message per cell of ``chunk_size`` recipients; mark the batch queued."""
    ranges = (
        (first, min(chunk_size, total - first + 1)) for first in range(1, total + 1, chunk_size)
    )
    count = await _publish_chunks(services, batch_id, provider, tenant_id, ranges)
    await services.pool.execute("UPDATE batches SET queued_at = now() WHERE id = $1", batch_id)
    return count


async def queue_cells(
    services: Services, batch_id: uuid.UUID, provider: str, tenant_id: str,
    seqs: Iterable[int], chunk_size: int, tag: str, generation: int = 0,
) -> int:  # fmt: skip
    """Chunks for the cells holding the given recipients again (a chunk sends only those
    still queued and not done: see ``engine.cells``)."""
    ranges = [(first, chunk_size) for first in cells_of(seqs, chunk_size)]
    return await _publish_chunks(services, batch_id, provider, tenant_id, ranges, tag, generation)


async def queue_unfinished(services: Services, batch_id: uuid.UUID, tag: str) -> int:
    """Chunks for every cell of the batch that still has ``queued`` recipients, carrying
    the batch's current generation (resume and recovery)."""
    batch = await services.pool.fetchrow(
        "SELECT provider, tenant_id, chunk_size, generation FROM batches WHERE id = $1", batch_id
    )
    firsts = await services.pool.fetch(
        """SELECT DISTINCT (seq - 1) / $2 * $2 + 1 AS first FROM recipients
            WHERE batch_id = $1 AND status = 'queued'""",
        batch_id, batch["chunk_size"],
    )  # fmt: skip
    return await queue_cells(
        services, batch_id, batch["provider"], batch["tenant_id"],
        [r["first"] for r in firsts], batch["chunk_size"], tag, batch["generation"],
    )  # fmt: skip


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
    spec, rows = await asyncio.to_thread(parse_json_request, data)  # compiles templates
    return await create_batch(services, tenant_id, spec, rows, external_id=msg_id)


def parse_json_request(data: bytes) -> tuple[BatchSpec, AsyncIterator[Any]]:
    """A whole create request as JSON (REST body or NATS message): fields and recipients."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    spec = parse_batch_fields(body)
    return spec, json_rows(body.get("recipients", [] if spec.draft else None), data)


def json_rows(recipients: Any, data: bytes) -> AsyncIterator[list[Any]]:
    """The recipients list of a JSON body ``data`` as blocks of rows; a recipient holding
    a NUL character becomes a ``BadRow`` (looked for only when the body has one)."""
    if not isinstance(recipients, list):
        raise ValidationError("recipients: must be a list", {"field": "recipients"})
    if b"\\u0000" in data:
        recipients = [BadRow(_NUL_ROW) if _has_nul(r) else r for r in recipients]
    return list_rows(recipients)


async def split_ndjson_header(
    blocks: AsyncIterator[list[Any]],
) -> tuple[dict[str, Any] | None, AsyncIterator[list[Any]]]:
    """An NDJSON upload may start with one line of batch fields (an object without ``email``)."""
    first: list[Any] = []
    async for first in blocks:
        if first:
            break
    header = None
    if first and isinstance(first[0], dict) and "email" not in first[0]:
        header, first = first[0], first[1:]

    async def rejoined() -> AsyncIterator[list[Any]]:
        if first:
            yield first
        async for block in blocks:
            yield block

    return header, rejoined()
