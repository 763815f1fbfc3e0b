"""Correlation ids for the logs: a trace id per API request, the batch in the workers.

``engine.logs.JsonFormatter`` adds what is bound here to every line, so log calls need not
pass it: ``trace_id`` while an API request is handled (``api.app.trace_middleware``: the
trace-id of the request's W3C ``traceparent`` header when it has a valid one, else a new
one, and answered in ``X-Request-Id``), and ``batch_id``/``tenant_id`` while a worker
handles a chunk of a batch (``bind``).

Workers use the batch id as their correlation id, not the trace id of the request that
created the batch: a batch's work outlives any one request and is started by many (create,
send, resume, the leader's scheduled starts and recoveries), and carrying a request's id
with every chunk message would tie the batch to one of them. The API's ``batch created``
line carries both the request's ``trace_id`` and the ``batch_id``: from a trace id to the
batch, then to every worker line of it.

Values live in context variables: each asyncio task (an aiohttp request, a worker's
chunk) sees its own, and tasks it starts inherit them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any

TRACE_ID: ContextVar[str | None] = ContextVar("trace_id", default=None)
_FIELDS: ContextVar[Mapping[str, Any]] = ContextVar("log_fields", default={})  # noqa: B039 - never mutated

# W3C Trace Context: version "-" trace-id "-" parent-id "-" flags, lower-case hex.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def new_trace_id() -> str:
    """A random W3C trace-id: 32 lower-case hex digits."""
    return os.urandom(16).hex()


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace-id of a valid W3C ``traceparent`` header value, else None.

    Invalid: not the format, version ``ff``, a version-00 header with more fields, an
    all-zero trace-id or parent-id.
    """
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None:
        return None
    version, trace_id, parent_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id


def bind(**fields: Any) -> Token:
    """Add ``fields`` to every log line of the current task from now on (and of the tasks
    it starts); the returned token undoes it (``unbind``). A worker's chunk is a task of its
    own, so what it binds ends with it."""
    return _FIELDS.set({**_FIELDS.get(), **fields})


def unbind(token: Token) -> None:
    _FIELDS.reset(token)


def context_fields() -> Mapping[str, Any]:
    """The fields bound in the current context, ``trace_id`` included when set."""
    fields = _FIELDS.get()
    trace_id = TRACE_ID.get()
    if trace_id is not None:
        return {"trace_id": trace_id, **fields}
    return fields
