"""The OpenAPI 3 document served at ``/api/openapi.json`` (kept beside the routes it describes)."""

from __future__ import annotations

from typing import Any

from engine.adapters import CHUNK_SIZES
from engine.batches import BATCH_STATUSES, RECIPIENT_STATUSES

_ERROR = {"$ref": "#/components/responses/Error"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _page(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"data": {"type": "array", "items": _ref(item)},
                       "next_cursor": {"type": "string", "nullable": True}},
    }  # fmt: skip


_BATCH_FIELDS: dict[str, Any] = {
    "name": {"type": "string", "maxLength": 200},
    "from_email": {"type": "string", "format": "email"},
    "from_name": {"type": "string"},
    "subject": {"type": "string", "description": "Template: {{ var }} placeholders."},
    "html": {"type": "string", "description": "Template; values are HTML-escaped."},
    "text": {"type": "string", "description": "Template."},
    "provider": {"type": "string", "enum": list(CHUNK_SIZES)},
    "scheduled_at": {"type": "string", "format": "date-time"},
    "dry_run": {"type": "boolean"},
    "draft": {"type": "boolean"},
    "metadata": {"type": "object"},
}
_QUERY_FIELDS = [
    {"name": name, "in": "query", "required": False, "schema": schema,
     "description": "Batch field, for streamed (CSV/NDJSON) bodies."}
    for name, schema in _BATCH_FIELDS.items() if name != "metadata"
]  # fmt: skip
_PAGING = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
]


def _object(
    properties: dict[str, Any], *, required: list[str] | None = None, streamed: bool = False
) -> dict[str, Any]:
    """A request body: a JSON object with these properties (``streamed``: or NDJSON/CSV)."""
    schema: dict[str, Any] = {"type": "object"}
    if required:
        schema["required"] = required
    content = {"application/json": {"schema": {**schema, "properties": properties}}}
    if streamed:
        content |= {
            kind: {"schema": {"type": "string"}} for kind in ("application/x-ndjson", "text/csv")
        }
    return {"required": True, "content": content}


def _path(name: str, **schema: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", **schema}}


_ID = _path("id", format="uuid")

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
                "properties": {
                    "email": {"type": "string", "format": "email"},
                    "name": {"type": "string"},
                    "vars": {"type": "object", "additionalProperties": True},
                },
            },
            "BatchCreate": {
                "type": "object",
                "required": ["name", "from_email", "subject", "provider", "recipients"],
                "properties": {
                    **_BATCH_FIELDS,
                    "recipients": {"type": "array", "items": _ref("Recipient")},
                },
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
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": "string", "format": "date-time", "nullable": True},
                    "completed_at": {"type": "string", "format": "date-time", "nullable": True},
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
                    {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},
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
                    {"name": "external_id", "in": "query", "schema": {"type": "string"}},
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
                    {"recipients": {"type": "array", "items": _ref("Recipient")}}, streamed=True
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
        "/api/suppressions": {
            "get": {
                "summary": "The tenant's suppressed addresses, in address order",
                "parameters": _PAGING,
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
                        "emails": {"type": "array", "items": {"type": "string", "format": "email"}},
                        "reason": {"type": "string"},
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
                "parameters": [_path("email")],
                "responses": {"204": {"description": "Removed"}, "401": _ERROR, "404": _ERROR},
            }
        },
        "/api/queue/stats": {
            "get": {
                "summary": "Per stream and consumer: pending, ack-pending, redelivered, oldest age",
                "responses": {"200": {"description": "Queue state"}, "401": _ERROR},
            }
        },
        "/api/queue/dlq": {
            "get": {
                "summary": "The tenant's dead-lettered messages with their reasons, oldest first",
                "parameters": _PAGING,
                "responses": {"200": {"description": "A page"}, "401": _ERROR, "422": _ERROR},
            }
        },
        "/api/queue/dlq/replay": {
            "post": {
                "summary": "Queue chosen dead letters (or all) again; they leave the DLQ",
                "requestBody": _object(
                    {
                        "seqs": {"type": "array", "items": {"type": "integer"}},
                        "all": {"type": "boolean"},
                    }
                ),
                "responses": {
                    "200": {"description": "How many were replayed"},
                    "400": _ERROR,
                    "401": _ERROR,
                    "422": _ERROR,
                },
            }
        },
        "/unsubscribe/{token}": {
            "get": {
                "security": [],
                "summary": "Confirmation page of a List-Unsubscribe link",
                "parameters": [_path("token")],
                "responses": {"200": {"description": "HTML"}, "404": _ERROR},
            },
            "post": {
                "security": [],
                "summary": "One-click unsubscribe (RFC 8058)",
                "parameters": [_path("token")],
                "responses": {"200": {"description": "HTML"}, "404": _ERROR},
            },
        },
        "/webhooks/{provider}": {
            "post": {
                "security": [],
                "summary": "Provider delivery events (signature checked per provider)",
                "parameters": [_path("provider")],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
                "responses": {
                    "200": {"description": "Accepted"},
                    "400": _ERROR,
                    "401": _ERROR,
                    "404": _ERROR,
                },
            }
        },
    },
}
