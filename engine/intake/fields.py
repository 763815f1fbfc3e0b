"""The batch fields of a create request (JSON body, NDJSON header line or query
parameters), validated into a ``BatchSpec``; and the validation errors' summary line."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from engine.errors import ValidationError
from engine.templates import BatchTemplate
from providers.registry import PROVIDERS

EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@"
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)
_BATCH_FIELDS = {
    "name",
    "from_email",
    "from_name",
    "subject",
    "html",
    "text",
    "provider",
    "provider_account",
    "scheduled_at",
    "dry_run",
    "metadata",
    "draft",
    "recipients",
}


def valid_email(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 254 and EMAIL.fullmatch(value) is not None


@dataclass(slots=True)
class BatchSpec:
    """The batch fields of a create request, validated."""

    name: str
    from_email: str
    from_name: str | None
    subject: str
    html: str | None
    text: str | None
    provider: str  # "" when only provider_account names it
    provider_account: str | None = None  # a tenant's provider account, by name or id
    scheduled_at: datetime | None = None
    dry_run: bool = False
    draft: bool = False
    metadata: dict[str, Any] | None = None
    template: BatchTemplate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.template = BatchTemplate(self.subject, self.html, self.text)


# The longest value of each text field (the OpenAPI document states the same).
FIELD_LIMITS = {
    "name": 200,
    "from_email": 254,
    "from_name": 200,
    "subject": 998,
    "html": 2 << 20,
    "text": 2 << 20,
    "provider": 32,
    "provider_account": 100,
}
# provider may be left out when provider_account names the account (and so its provider).
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
        required = name in REQUIRED_FIELDS and not (
            name == "provider" and data.get("provider_account") is not None
        )
        return text(name, required=required, max_len=FIELD_LIMITS[name])

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
    if provider is not None and provider not in PROVIDERS:
        errors.append(
            {"field": "provider", "message": f"unknown provider; one of {', '.join(PROVIDERS)}"}
        )
    provider_account = field("provider_account")
    scheduled_at = _scheduled_at(data.get("scheduled_at"), errors)
    dry_run = _as_bool("dry_run", data.get("dry_run", False), errors)
    draft = _as_bool("draft", data.get("draft", False), errors)
    metadata = _metadata(data.get("metadata"), errors)
    if errors:
        raise ValidationError(summary(errors), {"errors": errors})
    return BatchSpec(
        name=name or "",
        from_email=from_email or "",
        from_name=from_name,
        subject=subject or "",
        html=html,
        text=body_text,
        provider=provider or "",
        provider_account=provider_account,
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
    elif has_nul(metadata):
        errors.append({"field": "metadata", "message": "must not contain NUL characters"})
    elif len(orjson.dumps(metadata)) > MAX_METADATA_BYTES:
        errors.append(
            {"field": "metadata", "message": f"must be at most {MAX_METADATA_BYTES} bytes as JSON"}
        )
    else:
        return metadata
    return None


def summary(errors: list[dict[str, Any]], invalid_rows: int = 0) -> str:
    first = errors[0]
    where = f"recipient {first['row']}" if "row" in first else first.get("field", "body")
    field_name = f" {first['field']}" if "row" in first and "field" in first else ""
    more = len(errors) - 1 if not invalid_rows else invalid_rows - 1
    tail = f" (and {more} more)" if more > 0 else ""
    return f"{where}{field_name}: {first['message']}{tail}"


def has_nul(value: Any) -> bool:
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
