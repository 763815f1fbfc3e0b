"""The OpenAPI 3 document served at ``/api/openapi.json`` (kept beside the routes it describes)."""

from __future__ import annotations

from typing import Any

from engine.accounts import CHECK_SECONDS, MAX_ACCOUNTS_PAGE, MAX_SECRET_CHARS
from engine.analytics import (
    EVENT_TYPES,
    INTERVALS,
    MAX_BUCKETS,
    MAX_RANGE,
    MAX_SERIES_ROWS,
    PROVIDER_NAMES,
    RATE_DEFINITIONS,
    TIME_PATTERN,
)
from engine.intake.copier import MAX_NAME_CHARS
from engine.intake.fields import (
    FIELD_LIMITS,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    REQUIRED_FIELDS,
    SCHEDULED_AT,
)
from engine.lifecycle import BATCH_STATUSES, RECIPIENT_STATUSES
from engine.suppressions import MAX_SUPPRESSIONS
from engine.webhook_deliveries import STATUSES as DELIVERY_STATUSES
from engine.webhook_endpoints import EVENT_TYPES as WEBHOOK_EVENT_TYPES
from engine.webhook_endpoints import MAX_DESCRIPTION_CHARS, MAX_ENDPOINTS, MAX_PAGE, MAX_URL_CHARS
from engine.webhook_outbox import BATCHING
from providers.registry import CREDENTIALS, PROVIDERS, WEBHOOKS

_ERROR = {"$ref": "#/components/responses/Error"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _page(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "data": {"type": "array", "items": _ref(item)},
            "next_cursor": {"type": "string", "nullable": True},
        },
    }


def _text(name: str, description: str = "", **extra: Any) -> dict[str, Any]:
    """A text field with the limits intake applies (no NUL characters in any)."""
    schema: dict[str, Any] = {"type": "string", "maxLength": FIELD_LIMITS[name], **extra}
    if name in REQUIRED_FIELDS:
        schema["minLength"] = 1
    else:
        schema["nullable"] = True
    if description:
        schema["description"] = description
    return schema


_BATCH_FIELDS: dict[str, Any] = {
    "name": _text("name"),
    "from_email": _text("from_email", format="email"),
    "from_name": _text("from_name"),
    "subject": _text("subject", "Template: {{ var }} placeholders."),
    "html": _text("html", "Template; values are HTML-escaped."),
    "text": _text("text", "Template."),
    "provider": {
        "type": "string",
        "enum": list(PROVIDERS),
        "description": "The provider; without provider_account, the server's default "
        "account of it is used (mock and smtp, where the environment configures them)",
    },
    "provider_account": {
        "type": "string",
        "maxLength": 100,
        "description": "One of your provider accounts (/api/provider-accounts), by name or "
        "id; provider may then be left out (it is the account's)",
    },
    "scheduled_at": {
        "type": "string",
        "pattern": SCHEDULED_AT,
        "nullable": True,
        "description": "ISO 8601 date-time; without an offset it is UTC",
    },
    "dry_run": {"type": "boolean"},
    "draft": {"type": "boolean"},
    "metadata": {
        "type": "object",
        "nullable": True,
        "description": f"At most {MAX_METADATA_BYTES} bytes as JSON, "
        f"{MAX_METADATA_DEPTH} levels deep.",
    },
}
# As query parameters (streamed bodies) the templates are short: the request line is at
# most 64 KiB (longer ones go in the NDJSON header line).
_QUERY_LIMITS = {"html": 1000, "text": 1000}
_QUERY_FIELDS = (
    [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {
                **schema,
                "nullable": False,
                **({"maxLength": _QUERY_LIMITS[name]} if name in _QUERY_LIMITS else {}),
            },
            "description": "Batch field, for streamed (CSV/NDJSON) bodies only.",
        }
        for name, schema in _BATCH_FIELDS.items()
        if name not in ("metadata", "dry_run", "draft")
    ]
    + [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["true", "false", "1", "0"]},
            "description": "Batch field, for streamed (CSV/NDJSON) bodies.",
        }
        for name in ("dry_run", "draft")
    ]
    + [
        {
            "name": "metadata",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "maxLength": 1000},
            "description": "Batch field for streamed bodies: a JSON object's text.",
        },
    ]
)
_PAGING = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "cursor", "in": "query", "schema": {"type": "string", "maxLength": 512}},
]


def _object(
    properties: dict[str, Any],
    *,
    required: list[str] | None = None,
    streamed: bool = False,
    choice: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A request body: a JSON object with these properties and no others (``streamed``: or
    NDJSON/CSV; ``choice``: it must also match one of these)."""
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if required:
        schema["required"] = required
    if choice:
        schema["anyOf"] = choice
    content = {"application/json": {"schema": {**schema, "properties": properties}}}
    if streamed:
        content |= {
            kind: {"schema": {"type": "string"}} for kind in ("application/x-ndjson", "text/csv")
        }
    return {"required": True, "content": content}


_ACCOUNT_BODY = _object(
    {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"},
        "provider": {"type": "string", "enum": list(CREDENTIALS)},
        "credentials": {
            "type": "object",
            "additionalProperties": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_SECRET_CHARS,
            },
        },
        "base_url": {"type": "string", "format": "uri", "nullable": True},
        "region": {"type": "string", "nullable": True, "example": "eu-west-1"},
        "domain": {"type": "string", "nullable": True},
        "rate_per_second": {
            "type": "number",
            "minimum": 0,
            "exclusiveMinimum": True,
        },
        "burst": {"type": "integer", "minimum": 1, "nullable": True},
        "daily_quota": {"type": "integer", "minimum": 1, "nullable": True},
        "webhook_secret": {
            "type": "string",
            "nullable": True,
            "maxLength": MAX_SECRET_CHARS,
        },
    },
    required=["name", "provider", "credentials", "rate_per_second"],
)


def _path(name: str, **schema: Any) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", **schema}}


_ID = _path("id", format="uuid")

_EVENTS = "|".join(EVENT_TYPES)
_RANGE = (
    "`from` must be before `to` (400 `invalid_range`), at most "
    f"{MAX_RANGE.days} days apart (400 `range_too_long`). 503 `analytics_unavailable` "
    "when ClickHouse does not answer."
)
_TIME_RANGE = [
    {
        "name": "from",
        "in": "query",
        "description": "Start (inclusive), ISO 8601; UTC without an offset. Default: 24 hours "
        "before `to`. Malformed, or outside 1970-01-01 to 2100-01-01: 400 `invalid_time`.",
        "schema": {"type": "string", "pattern": TIME_PATTERN},
    },
    {
        "name": "to",
        "in": "query",
        "description": "End (exclusive), ISO 8601; UTC without an offset. Default: now.",
        "schema": {"type": "string", "pattern": TIME_PATTERN},
    },
]
_PROVIDER = {
    "name": "provider",
    "in": "query",
    "description": "Only this provider's events (400 `unknown_provider` for another name)",
    "schema": {"type": "string", "enum": list(PROVIDER_NAMES)},
}
_UTC = {"type": "string", "format": "date-time", "description": "UTC"}


def _webhook_post(*, account: bool) -> dict[str, Any]:
    """``POST /webhooks/{provider}`` (the server's default account of the provider) and
    ``POST /webhooks/{provider}/{account_id}`` (a tenant's account, checked with its
    ``webhook_secret``)."""
    providers = [p for p in WEBHOOKS if p in CREDENTIALS] if account else list(WEBHOOKS)
    summary = (
        "Delivery events of one of a tenant's provider accounts (checked with its webhook_secret)"
        if account
        else "Delivery events of the server's default account of a provider"
    )
    return {
        "security": [],
        "summary": summary,
        "description": "".join(f"{name}: {WEBHOOKS[name].scheme}. " for name in providers)
        + "401 `bad_signature`; `stale_signature` when the post was signed more than 5 "
        "minutes from the server's clock (SES/SNS: over an hour ago); `replayed_signature` "
        "for a post already received (Postmark, Resend and SES repeat their own posts: "
        "answered 200 with `duplicate: true`, nothing handed on twice). 404 "
        "`unknown_provider` for a provider without a webhook route here"
        + (
            ", `account_not_found` for no such account of that provider (or one without a "
            "webhook secret)"
            if account
            else ""
        )
        + ". Events about batches not sent through this account are ignored (counted in "
        "`ignored`). An SNS SubscriptionConfirmation that verifies is confirmed (`subscribed: "
        "true`; 502 `subscription_not_confirmed` when SNS could not be reached).",
        "parameters": [
            _path("provider", enum=providers),
            *([_path("account_id", format="uuid")] if account else []),
            *(
                {"name": header, "in": "header", "schema": {"type": "string"}}
                for header in dict.fromkeys(h for p in providers for h in WEBHOOKS[p].headers)
            ),
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
        "responses": {
            "200": {"description": "Accepted: `{accepted, ignored, duplicate?, subscribed?}`"},
            "400": _ERROR,
            "401": _ERROR,
            "404": _ERROR,
            **({"502": _ERROR} if account else {}),
        },
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "BatchSender API", "version": "0.1.0"},
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        },
        "responses": {
            "Error": {
                "description": "Error",
                "content": {"application/json": {"schema": _ref("Error")}},
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "details": {"nullable": True},
                        },
                    }
                },
            },
            "Recipient": {
                "type": "object",
                "required": ["email"],
                "additionalProperties": False,
                "properties": {
                    "email": {"type": "string", "format": "email", "maxLength": 254},
                    "name": {"type": "string", "maxLength": MAX_NAME_CHARS, "nullable": True},
                    "vars": {
                        "type": "object",
                        "additionalProperties": True,
                        "nullable": True,
                        "description": "Template variables (a template may need some)",
                    },
                },
            },
            "BatchCreate": {
                "type": "object",
                "required": [f for f in REQUIRED_FIELDS if f != "provider"],
                "additionalProperties": False,
                "properties": {
                    **_BATCH_FIELDS,
                    "recipients": {"type": "array", "items": _ref("Recipient")},
                },
                "allOf": [
                    {
                        "anyOf": [
                            {"required": ["html"], "properties": {"html": {"type": "string"}}},
                            {"required": ["text"], "properties": {"text": {"type": "string"}}},
                        ]
                    },
                    {"anyOf": [{"required": ["provider"]}, {"required": ["provider_account"]}]},
                    {
                        "anyOf": [
                            {
                                "required": ["recipients"],
                                "properties": {"recipients": {"minItems": 1}},
                            },
                            {"required": ["draft"], "properties": {"draft": {"enum": [True]}}},
                        ]
                    },
                ],
            },
            "Created": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "status": {"type": "string", "enum": list(BATCH_STATUSES)},
                    "total_recipients": {"type": "integer"},
                    "suppressed": {"type": "integer"},
                },
            },
            "Batch": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "status": {"type": "string", "enum": list(BATCH_STATUSES)},
                    "total_recipients": {"type": "integer"},
                    "counts": {
                        "type": "object",
                        "properties": {s: {"type": "integer"} for s in RECIPIENT_STATUSES},
                    },
                    "progress": {"type": "object"},
                    "external_id": {"type": "string", "nullable": True},
                    "provider_account_id": {"type": "string", "nullable": True},
                    "pause_reason": {
                        "type": "string",
                        "nullable": True,
                        "description": "Why the engine paused the batch (the provider "
                        "refused the account, its daily quota is used up); null for an "
                        "operator's pause",
                    },
                    "resume_at": {
                        "type": "string",
                        "format": "date-time",
                        "nullable": True,
                        "description": "When the engine resumes the batch by itself",
                    },
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": "string", "format": "date-time", "nullable": True},
                    "completed_at": {"type": "string", "format": "date-time", "nullable": True},
                },
            },
            "ProviderAccountCheck": {
                "type": "object",
                "required": ["ok", "detail", "account", "provider", "call", "quota", "seconds"],
                "properties": {
                    "ok": {
                        "type": "boolean",
                        "description": "The provider accepted the credentials and said nothing "
                        "that stops the account sending",
                    },
                    "detail": {
                        "type": "string",
                        "description": "What was found, or why not, in one sentence (never a "
                        "credential)",
                    },
                    "account": {"type": "string", "description": "The account's name"},
                    "provider": {"type": "string", "enum": list(CREDENTIALS)},
                    "call": {
                        "type": "string",
                        "nullable": True,
                        "description": "The request made, e.g. GET /v3/scopes",
                    },
                    "quota": {
                        "type": "object",
                        "nullable": True,
                        "description": "What the provider says the account may send, where it "
                        "says (SES)",
                        "properties": {
                            name: {"type": "number", "nullable": True}
                            for name in ("per_day", "per_second", "sent_last_24_hours")
                        },
                    },
                    "seconds": {"type": "number", "description": "How long the check took"},
                },
            },
            "WebhookEndpoint": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "url": {"type": "string", "format": "uri"},
                    "event_types": {
                        "type": "array",
                        "items": {"type": "string", "enum": list(WEBHOOK_EVENT_TYPES)},
                    },
                    "description": {"type": "string", "nullable": True},
                    "secret_hint": {"type": "string", "description": "whsec_•••• and 4 more"},
                    "enabled": {"type": "boolean", "description": "false once it answered 410"},
                    "disabled_at": {"type": "string", "format": "date-time", "nullable": True},
                    "disabled_reason": {"type": "string", "nullable": True},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
            "WebhookEndpointCreated": {
                "allOf": [
                    _ref("WebhookEndpoint"),
                    {
                        "type": "object",
                        "properties": {
                            "secret": {
                                "type": "string",
                                "description": "The signing secret (whsec_ + base64), shown "
                                "this once",
                            }
                        },
                    },
                ]
            },
            "WebhookDelivery": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "format": "uuid", "description": "webhook-id"},
                    "status": {"type": "string", "enum": list(DELIVERY_STATUSES)},
                    "event_count": {"type": "integer"},
                    "attempts": {"type": "integer"},
                    "last_status_code": {"type": "integer", "nullable": True},
                    "last_error": {"type": "string", "nullable": True},
                    "created_at": {"type": "string", "format": "date-time"},
                    "last_attempt_at": {"type": "string", "format": "date-time", "nullable": True},
                    "next_attempt_at": {"type": "string", "format": "date-time", "nullable": True},
                    "delivered_at": {"type": "string", "format": "date-time", "nullable": True},
                    "replayed_at": {"type": "string", "format": "date-time", "nullable": True},
                },
            },
            "ApiKey": {
                "type": "object",
                "required": ["id", "prefix", "created_at", "revoked_at", "last_used_at"],
                "properties": {
                    "id": {"type": "integer"},
                    "prefix": {"type": "string", "description": "The key's first characters"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "revoked_at": {"type": "string", "format": "date-time", "nullable": True},
                    "last_used_at": {
                        "type": "string",
                        "format": "date-time",
                        "nullable": True,
                        "description": "To a minute",
                    },
                },
            },
            "EventCounts": {
                "type": "object",
                "description": "Events per type (every type, 0 when none)",
                "required": list(EVENT_TYPES),
                "properties": {e: {"type": "integer", "minimum": 0} for e in EVENT_TYPES},
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "Rates": {
                "type": "object",
                "description": "Ratios of event counts, rounded to 6 places; null when the "
                "denominator is 0. "
                + "; ".join(f"{name} = {rule}" for name, rule in RATE_DEFINITIONS.items()),
                "required": list(RATE_DEFINITIONS),
                "properties": {
                    name: {"type": "number", "nullable": True, "minimum": 0, "description": rule}
                    for name, rule in RATE_DEFINITIONS.items()
                },
            },
            "AnalyticsOverview": {
                "type": "object",
                "required": ["from", "to", "provider", "counts", "rates"],
                "properties": {
                    "from": _UTC,
                    "to": _UTC,
                    "provider": {"type": "string", "nullable": True},
                    "counts": _ref("EventCounts"),
                    "rates": _ref("Rates"),
                },
            },
            "AnalyticsBatch": {
                "type": "object",
                "required": [
                    "batch_id",
                    "counts",
                    "rates",
                    "series",
                    "series_truncated",
                    "latency_ms",
                ],
                "properties": {
                    "batch_id": {"type": "string", "format": "uuid"},
                    "counts": _ref("EventCounts"),
                    "rates": _ref("Rates"),
                    "series": {
                        "type": "array",
                        "description": "Counts per minute and event type, oldest first; "
                        "only minutes with events; at most "
                        f"{MAX_SERIES_ROWS} rows (then `series_truncated`)",
                        "maxItems": MAX_SERIES_ROWS,
                        "items": {
                            "type": "object",
                            "required": ["minute", "event", "count"],
                            "properties": {
                                "minute": _UTC,
                                "event": {"type": "string"},
                                "count": {"type": "integer", "minimum": 0},
                            },
                        },
                    },
                    "series_truncated": {"type": "boolean"},
                    "latency_ms": {
                        "type": "object",
                        "description": "Provider call latency of the batch's sent events: "
                        "exact quantiles (the value at index floor(level * samples) of the "
                        "sorted latencies); null without samples",
                        "required": ["samples", "p50", "p95", "p99", "max"],
                        "properties": {
                            "samples": {"type": "integer", "minimum": 0},
                            **{
                                name: {"type": "integer", "nullable": True, "minimum": 0}
                                for name in ("p50", "p95", "p99", "max")
                            },
                        },
                    },
                },
            },
            "AnalyticsTimeseries": {
                "type": "object",
                "required": ["from", "to", "interval", "provider", "events", "buckets"],
                "properties": {
                    "from": _UTC,
                    "to": _UTC,
                    "interval": {"type": "integer", "description": "Seconds per bucket"},
                    "provider": {"type": "string", "nullable": True},
                    "events": {
                        "type": "array",
                        "items": {"type": "string", "enum": list(EVENT_TYPES)},
                    },
                    "buckets": {
                        "type": "array",
                        "description": "Every bucket of the range, oldest first",
                        "maxItems": MAX_BUCKETS,
                        "items": {
                            "type": "object",
                            "required": ["start", "counts"],
                            "properties": {
                                "start": _UTC,
                                "counts": {
                                    "type": "object",
                                    "description": "A count for each event type asked for",
                                    "additionalProperties": {"type": "integer", "minimum": 0},
                                },
                            },
                        },
                    },
                },
            },
            "RecipientStatus": {
                "type": "object",
                "properties": {
                    "seq": {"type": "integer"},
                    "email": {"type": "string"},
                    "status": {"type": "string", "enum": list(RECIPIENT_STATUSES)},
                    "provider_message_id": {"type": "string", "nullable": True},
                    "error": {"type": "string", "nullable": True},
                },
            },
        },
    },
    "security": [{"bearer": []}, {"apiKey": []}],
    "paths": {
        "/health": {
            "get": {
                "security": [],
                "summary": "Dependency checks",
                "responses": {
                    "200": {"description": "All up"},
                    "503": {"description": "Names what is down"},
                },
            }
        },
        "/health/live": {
            "get": {
                "security": [],
                "summary": "Process is running",
                "responses": {"200": {"description": "Alive"}},
            }
        },
        "/api/metrics": {
            "get": {
                "security": [],
                "summary": "Prometheus metrics of every process",
                "responses": {
                    "200": {"description": "Prometheus text format", "content": {"text/plain": {}}}
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "security": [],
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3"}},
            }
        },
        "/api/batches": {
            "post": {
                "summary": "Create (and unless draft, queue) a batch",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
                    },
                    *_QUERY_FIELDS,
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("BatchCreate")},
                        "application/x-ndjson": {
                            "schema": {"type": "string"},
                            "description": "Optional first line: batch fields; then one Recipient per line.",
                        },
                        "text/csv": {
                            "schema": {"type": "string"},
                            "description": "Header line with an email column, optional name; other columns are vars. "
                            "Batch fields as query parameters.",
                        },
                    },
                },
                "responses": {
                    "201": {
                        "description": "Created",
                        "content": {"application/json": {"schema": _ref("Created")}},
                    },
                    "400": _ERROR,
                    "401": _ERROR,
                    "409": _ERROR,
                    "413": _ERROR,
                    "415": _ERROR,
                    "422": _ERROR,
                    "429": _ERROR,
                },
            },
            "get": {
                "summary": "List batches, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(BATCH_STATUSES)},
                    },
                    {
                        "name": "external_id",
                        "in": "query",
                        "schema": {"type": "string", "maxLength": 255},
                    },
                    *_PAGING,
                ],
                "responses": {
                    "200": {
                        "description": "A page",
                        "content": {"application/json": {"schema": _page("Batch")}},
                    },
                    "401": _ERROR,
                    "422": _ERROR,
                },
            },
        },
        "/api/batches/{id}": {
            "get": {
                "summary": "A batch with counts per recipient status",
                "parameters": [_ID],
                "responses": {
                    "200": {
                        "description": "The batch",
                        "content": {"application/json": {"schema": _ref("Batch")}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                },
            }
        },
        **{
            f"/api/batches/{{id}}/{action}": {
                "post": {
                    "summary": summary,
                    "parameters": [_ID],
                    "responses": {
                        "200": {
                            "description": "The batch after the change",
                            "content": {"application/json": {"schema": _ref("Batch")}},
                        },
                        "401": _ERROR,
                        "404": _ERROR,
                        "409": _ERROR,
                    },
                }
            }
            for action, summary in (
                ("pause", "Stop new sends within about a second (queued or processing)"),
                ("resume", "Continue a paused batch where it stopped"),
                ("cancel", "End an unfinished batch; unsent recipients become cancelled"),
                ("send", "Queue a draft (or schedule it when scheduled_at is ahead)"),
            )
        },
        "/api/batches/{id}/recipients": {
            "post": {
                "summary": "Add recipients to a draft (numbered after its others)",
                "parameters": [_ID],
                "requestBody": _object(
                    {"recipients": {"type": "array", "items": _ref("Recipient"), "minItems": 1}},
                    required=["recipients"],
                    streamed=True,
                ),
                "responses": {
                    "200": {
                        "description": "The draft's new size",
                        "content": {"application/json": {"schema": _ref("Created")}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                    "409": _ERROR,
                    "415": _ERROR,
                    "422": _ERROR,
                },
            },
            "get": {
                "summary": "Recipients of a batch in order",
                "parameters": [
                    _ID,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(RECIPIENT_STATUSES)},
                    },
                    *_PAGING,
                ],
                "responses": {
                    "200": {
                        "description": "A page",
                        "content": {"application/json": {"schema": _page("RecipientStatus")}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                    "422": _ERROR,
                },
            },
        },
        "/api/provider-accounts": {
            "post": {
                "summary": "Add a provider account (its credentials are sealed, never shown again)",
                "description": "`credentials` holds exactly what the provider needs: "
                + "; ".join(f"{p}: {', '.join(names)}" for p, names in CREDENTIALS.items())
                + ". `burst` defaults to one second's worth of `rate_per_second`. 409 "
                "`account_exists` for a name the tenant has already; 422 `invalid_account` "
                "naming the field.",
                "requestBody": _ACCOUNT_BODY,
                "responses": {
                    "201": {"description": "The account, credentials as masked hints"},
                    "401": _ERROR,
                    "409": _ERROR,
                    "422": _ERROR,
                },
            },
            "get": {
                "summary": "The tenant's provider accounts by name (credentials masked)",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ACCOUNTS_PAGE},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "The last name seen",
                        "schema": {"type": "string", "maxLength": 100},
                    },
                ],
                "responses": {"200": {"description": "A page"}, "401": _ERROR, "422": _ERROR},
            },
        },
        "/api/provider-accounts/{ref}": {
            "get": {
                "summary": "One provider account, by id or name (credentials masked)",
                "parameters": [_path("ref", maxLength=100)],
                "responses": {"200": {"description": "The account"}, "401": _ERROR, "404": _ERROR},
            },
            "put": {
                "summary": "Replace a provider account's settings, credentials again in full "
                "(the provider cannot change); workers use them within 30 seconds",
                "parameters": [_path("ref", maxLength=100)],
                "requestBody": _ACCOUNT_BODY,
                "responses": {
                    "200": {"description": "The account, credentials as masked hints"},
                    "401": _ERROR,
                    "404": _ERROR,
                    "409": _ERROR,
                    "422": _ERROR,
                },
            },
            "delete": {
                "summary": "Remove a provider account, by id or name (409 while an unfinished "
                "batch sends through it)",
                "parameters": [_path("ref", maxLength=100)],
                "responses": {
                    "204": {"description": "Removed"},
                    "401": _ERROR,
                    "404": _ERROR,
                    "409": _ERROR,
                },
            },
        },
        "/api/provider-accounts/{ref}/check": {
            "post": {
                "summary": "Test a provider account's credentials with its provider (nothing "
                "is sent)",
                "description": "The account's adapter makes its provider's cheapest "
                f"authenticated read call, within {CHECK_SECONDS:g} seconds: SendGrid `GET "
                "/v3/scopes` (the "
                "key needs `mail.send`), Mailgun `GET /v3/domains/{domain}`, Postmark `GET "
                "/server`, Resend `GET /domains` (a sending-access key is ok, with a note), SES "
                "`GET /v2/email/account` (`SendingEnabled`, the quota), SMTP a login (EHLO, "
                "TLS as a send would, AUTH, QUIT). 200 whatever the provider answered: `ok` "
                "false with the reason when the credentials are refused, the provider cannot "
                "be reached or does not answer in time.",
                "parameters": [_path("ref", maxLength=100)],
                "responses": {
                    "200": {
                        "description": "The check ran",
                        "content": {"application/json": {"schema": _ref("ProviderAccountCheck")}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                },
            },
        },
        "/api/webhook-endpoints": {
            "post": {
                "summary": "Register a URL for the tenant's batch events (its secret is shown once)",
                "description": 'BatchSender posts `{"type": "batch.events", "timestamp", '
                f'"data": [event, ...]}}` to the URL, up to {BATCHING.max_events} events per post, '
                "signed with the Standard Webhooks scheme (headers webhook-id, webhook-timestamp, "
                "webhook-signature; verify with `standardwebhooks.Webhook(secret).verify`). "
                "A recipient event: type, batch_id, recipient (seq), email, provider, "
                "provider_message_id, timestamp, error when it failed; batch.completed: "
                "batch_id, name, status, total_recipients, counts, timestamp. A 2xx answer "
                "delivers; 410 disables the endpoint; anything else is retried with "
                "exponential backoff for about a day. `url`: https (http and private "
                f"addresses only where the server allows them), at most {MAX_URL_CHARS} "
                "characters, no credentials. 422 `invalid_webhook_endpoint` naming the "
                f"field; 409 `too_many_webhook_endpoints` past {MAX_ENDPOINTS}.",
                "requestBody": _object(
                    {
                        "url": {"type": "string", "format": "uri", "maxLength": MAX_URL_CHARS},
                        "event_types": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "enum": list(WEBHOOK_EVENT_TYPES)},
                        },
                        "description": {
                            "type": "string",
                            "nullable": True,
                            "maxLength": MAX_DESCRIPTION_CHARS,
                        },
                    },
                    required=["url", "event_types"],
                ),
                "responses": {
                    "201": {
                        "description": "The endpoint and its secret",
                        "content": {"application/json": {"schema": _ref("WebhookEndpointCreated")}},
                    },
                    "401": _ERROR,
                    "409": _ERROR,
                    "422": _ERROR,
                },
            },
            "get": {
                "summary": "The tenant's webhook endpoints, oldest first",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "A page",
                        "content": {"application/json": {"schema": _page("WebhookEndpoint")}},
                    },
                    "401": _ERROR,
                    "422": _ERROR,
                },
            },
        },
        "/api/webhook-endpoints/{id}": {
            "get": {
                "summary": "One webhook endpoint (no secret)",
                "parameters": [_path("id")],
                "responses": {
                    "200": {
                        "description": "The endpoint",
                        "content": {"application/json": {"schema": _ref("WebhookEndpoint")}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                },
            },
            "delete": {
                "summary": "Remove a webhook endpoint and its delivery log",
                "parameters": [_path("id")],
                "responses": {"204": {"description": "Removed"}, "401": _ERROR, "404": _ERROR},
            },
        },
        "/api/webhook-endpoints/{id}/deliveries": {
            "get": {
                "summary": "An endpoint's deliveries (one per post), newest first",
                "parameters": [
                    _path("id"),
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(DELIVERY_STATUSES)},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "A page",
                        "content": {"application/json": {"schema": _page("WebhookDelivery")}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                    "422": _ERROR,
                },
            },
        },
        "/api/webhook-endpoints/{id}/deliveries/{delivery_id}/replay": {
            "post": {
                "summary": "Post a delivery again (same webhook-id and body, a fresh retry "
                "budget); 409 `webhook_endpoint_disabled` once the endpoint answered 410",
                "parameters": [_path("id"), _path("delivery_id")],
                "responses": {
                    "202": {
                        "description": "The delivery, pending",
                        "content": {"application/json": {"schema": _ref("WebhookDelivery")}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                    "409": _ERROR,
                },
            },
        },
        "/api/suppressions": {
            "get": {
                "summary": "The tenant's suppressed addresses, in address order",
                "parameters": [
                    _PAGING[0],
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "The last address seen",
                        "schema": {"type": "string", "maxLength": 254},
                    },
                ],
                "responses": {
                    "200": {"description": "A page (next_cursor: the last address)"},
                    "401": _ERROR,
                    "422": _ERROR,
                },
            },
            "post": {
                "summary": "Suppress addresses",
                "requestBody": _object(
                    {
                        "emails": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_SUPPRESSIONS,
                            "items": {"type": "string", "format": "email", "maxLength": 254},
                        },
                        "reason": {"type": "string", "minLength": 1, "maxLength": 200},
                    },
                    required=["emails"],
                ),
                "responses": {
                    "201": {"description": "How many were new"},
                    "400": _ERROR,
                    "401": _ERROR,
                    "422": _ERROR,
                },
            },
        },
        "/api/suppressions/{email}": {
            "delete": {
                "summary": "Send to an address again",
                "parameters": [_path("email", maxLength=254)],
                "responses": {"204": {"description": "Removed"}, "401": _ERROR, "404": _ERROR},
            }
        },
        "/api/queue/stats": {
            "get": {
                "summary": "Per stream and consumer: pending, ack-pending, redelivered, oldest age",
                "description": "`consumers`: the figures of the pipeline every tenant shares "
                "(no tenant's data in them). `intake.waiting`: this tenant's own messages "
                "published to NATS and not yet recorded. No totals of the dead-letter stream "
                "(it holds every tenant's): page through your own with /api/queue/dlq.",
                "responses": {"200": {"description": "Queue state"}, "401": _ERROR},
            }
        },
        "/api/queue/dlq": {
            "get": {
                "summary": "The tenant's dead-lettered messages with their reasons, oldest first",
                "description": "One page scans at most 5,000 dead letters of all tenants, so a "
                "page may hold fewer entries than `limit` (even none) with a `next_cursor`: "
                "follow it until it is null.",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 9223372036854775806},
                    },
                ],
                "responses": {"200": {"description": "A page"}, "401": _ERROR, "422": _ERROR},
            }
        },
        "/api/queue/dlq/replay": {
            "post": {
                "summary": "Queue chosen dead letters (or all) again; they leave the DLQ",
                "description": 'Either {"seqs": [...]} (1 to 1,000 sequence numbers from '
                '/api/queue/dlq) or {"all": true}, not both; another tenant\'s seqs are skipped.',
                "requestBody": _object(
                    {
                        "seqs": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 1000,
                            "items": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                        },
                        "all": {"type": "boolean"},
                    },
                    choice=[
                        {"required": ["seqs"], "maxProperties": 1},
                        {
                            "required": ["all"],
                            "maxProperties": 1,
                            "properties": {"all": {"enum": [True]}},
                        },
                    ],
                ),
                "responses": {
                    "200": {"description": "How many were replayed"},
                    "400": _ERROR,
                    "401": _ERROR,
                    "422": _ERROR,
                },
            }
        },
        "/api/keys": {
            "get": {
                "summary": "The tenant's API keys, revoked ones too, newest first (never the keys)",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {
                        "description": "A page",
                        "content": {"application/json": {"schema": _page("ApiKey")}},
                    },
                    "401": _ERROR,
                    "422": _ERROR,
                },
            },
            "post": {
                "summary": "A new key for the calling tenant, shown once in `key`",
                "description": "At most 100 unrevoked keys per tenant (409 `too_many_keys`).",
                "responses": {
                    "201": {
                        "description": "Created",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "allOf": [
                                        _ref("ApiKey"),
                                        {
                                            "type": "object",
                                            "required": ["key"],
                                            "properties": {"key": {"type": "string"}},
                                        },
                                    ]
                                }
                            }
                        },
                    },
                    "401": _ERROR,
                    "409": _ERROR,
                },
            },
        },
        "/api/keys/{id}": {
            "delete": {
                "summary": "Revoke one of the tenant's keys; every API process refuses it "
                "before this answers",
                "parameters": [_path("id", maxLength=100)],
                "responses": {"204": {"description": "Revoked"}, "401": _ERROR, "404": _ERROR},
            }
        },
        "/api/analytics/overview": {
            "get": {
                "summary": "Counts per event type and rates over a time range (whole minutes)",
                "description": "From ClickHouse's per-minute aggregate; `from` is rounded "
                "down and `to` up to whole minutes. Counts are at least once: an event written "
                "twice after a writer crash is counted twice. " + _RANGE,
                "parameters": [*_TIME_RANGE, _PROVIDER],
                "responses": {
                    "200": {
                        "description": "Totals and rates",
                        "content": {"application/json": {"schema": _ref("AnalyticsOverview")}},
                    },
                    "400": _ERROR,
                    "401": _ERROR,
                    "503": _ERROR,
                },
            }
        },
        "/api/analytics/batches/{id}": {
            "get": {
                "summary": "One batch: counts, rates, per-minute series, provider latency",
                "description": "Another tenant's or an unknown batch: 404 `not_found`, as for "
                "GET /api/batches/{id}. 503 `analytics_unavailable` when ClickHouse does not "
                "answer.",
                "parameters": [_ID],
                "responses": {
                    "200": {
                        "description": "The batch's analytics",
                        "content": {"application/json": {"schema": _ref("AnalyticsBatch")}},
                    },
                    "401": _ERROR,
                    "404": _ERROR,
                    "503": _ERROR,
                },
            }
        },
        "/api/analytics/timeseries": {
            "get": {
                "summary": "Counts per time bucket and event type",
                "description": "Buckets start at multiples of the interval since "
                "1970-01-01T00:00:00Z (UTC hours and days); `from` is rounded down and `to` up "
                f"to whole buckets, at most {MAX_BUCKETS} of them (400 `too_many_buckets`). "
                + _RANGE,
                "parameters": [
                    {
                        "name": "interval",
                        "in": "query",
                        "description": "Bucket length: a name or its seconds; default hour "
                        "(400 `invalid_interval` otherwise)",
                        "schema": {"type": "string", "enum": list(INTERVALS)},
                    },
                    *_TIME_RANGE,
                    {
                        "name": "events",
                        "in": "query",
                        "description": "Comma list of event types; default all (400 "
                        "`unknown_event` for another)",
                        "schema": {"type": "string", "pattern": f"^({_EVENTS})(,({_EVENTS}))*$"},
                    },
                    _PROVIDER,
                ],
                "responses": {
                    "200": {
                        "description": "The buckets",
                        "content": {"application/json": {"schema": _ref("AnalyticsTimeseries")}},
                    },
                    "400": _ERROR,
                    "401": _ERROR,
                    "503": _ERROR,
                },
            }
        },
        "/unsubscribe/{token}": {
            "get": {
                "security": [],
                "summary": "Confirmation page of a List-Unsubscribe link",
                "description": "The token is opaque (sealed, not readable) and expires 90 days "
                "after the message was sent: 410 `link_expired`; not one of ours: 404.",
                "parameters": [_path("token", maxLength=600)],
                "responses": {"200": {"description": "HTML"}, "404": _ERROR, "410": _ERROR},
            },
            "post": {
                "security": [],
                "summary": "One-click unsubscribe (RFC 8058)",
                "parameters": [_path("token", maxLength=600)],
                "responses": {"200": {"description": "HTML"}, "404": _ERROR, "410": _ERROR},
            },
        },
        "/webhooks/{provider}": {"post": _webhook_post(account=False)},
        "/webhooks/{provider}/{account_id}": {"post": _webhook_post(account=True)},
    },
}


def _throttled_when_keys_fail(document: dict[str, Any]) -> None:
    """Every operation that needs a key may answer 429 ``too_many_failed_auth`` (with
    ``Retry-After``) to an address with too many failed keys (``engine.auth``)."""
    for item in document["paths"].values():
        for operation in item.values():
            if operation.get("security") != []:
                operation["responses"].setdefault("429", _ERROR)


def _bad_requests(document: dict[str, Any]) -> None:
    """What any operation may answer besides its own statuses: 400 for a path or query
    with a NUL character or text that is not UTF-8 (``api.app.text_middleware``); and
    where it reads a body, 408 for a body that stalls or trickles and 413 for one too
    large (``api.body``)."""
    for item in document["paths"].values():
        for operation in item.values():
            responses = operation["responses"]
            responses.setdefault("400", _ERROR)
            if "requestBody" in operation:
                responses.setdefault("408", _ERROR)
                responses.setdefault("413", _ERROR)


_throttled_when_keys_fail(OPENAPI)
_bad_requests(OPENAPI)
