"""Structured logs: one JSON line per event on stderr.

Each line has ``ts``, ``level``, ``logger``, ``pid`` and ``msg``, the fields passed in
``extra``, and what ``engine.tracing`` binds for the current task: ``trace_id`` while an API
request is handled, ``batch_id``/``tenant_id`` while a worker handles a chunk (a field given
in ``extra`` wins). An exception's traceback is in ``exc``.

Never an address, a key or a message body: log calls name batches, tenants and counts,
not recipients, and the errors they pass are checked where they are made. As a last line
of defence every line is scrubbed before it is written: whatever looks like an e-mail
address, an API key (``engine.tenants.API_KEY_PREFIX``) or the password of a URL is
replaced (``redact``). Message bodies cannot be recognised: they are never logged.

``setup_logging`` also sends through this formatter what Python would otherwise write to
stderr as plain text (warnings, uncaught exceptions of the main thread and of other
threads, "Exception ignored" messages), so every line of a process's output is JSON.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from typing import Any

import orjson

from engine.tracing import context_fields

# engine.tenants.API_KEY_PREFIX (a test keeps them equal), not imported: the mock provider
# logs through this module too and needs none of the engine's database modules.
API_KEY_PREFIX = "bsk_"

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

# What is scrubbed: a URL's password, then e-mail addresses, then API keys (a key's prefix of
# a few characters, shown in clear by `keys list`, stays).
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*):[^\s/@]+@")
_EMAIL = re.compile(r"[\w.!#$%&'+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_API_KEY = re.compile(re.escape(API_KEY_PREFIX) + r"[A-Za-z0-9_-]{16,}")
_MARKERS = (b"@", API_KEY_PREFIX.encode())


def redact(text: str) -> str:
    """``text`` without URL passwords, e-mail addresses and API keys."""
    if "@" in text:
        text = _URL_PASSWORD.sub(r"\1:<redacted>@", text)
        text = _EMAIL.sub("<email>", text)
    if API_KEY_PREFIX in text:
        text = _API_KEY.sub(API_KEY_PREFIX + "<redacted>", text)
    return text


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): _redacted(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redacted(item) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
            "msg": record.getMessage(),
        }
        entry.update(context_fields())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        line = orjson.dumps(entry, default=str)
        if any(marker in line for marker in _MARKERS):  # rare: scrub field by field
            line = orjson.dumps(_redacted(entry), default=str)
        return line.decode()


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)  # warnings as log lines of "py.warnings"
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    sys.unraisablehook = _unraisable


_log = logging.getLogger("batchsender.uncaught")


def _uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    _log.critical("uncaught exception", exc_info=(kind, value, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread else None
    _log.error(
        "uncaught exception in a thread",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        extra={"thread_name": thread},
    )


def _unraisable(args: Any) -> None:
    message = args.err_msg or "Exception ignored"
    _log.warning(
        message,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value else None,
        extra={"object": repr(args.object)[:200]},
    )
