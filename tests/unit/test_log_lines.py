"""engine.logs and engine.tracing: what one log line holds, and what it never does."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys

import orjson
import pytest

from engine import logs, tenants, tracing
from engine.logs import JsonFormatter, redact


def line(msg: str, *args: object, exc: BaseException | None = None, **extra: object) -> dict:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, None)
    if exc is not None:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    record.__dict__.update(extra)
    return orjson.loads(JsonFormatter().format(record))


def test_the_key_prefix_is_the_engines():
    assert logs.API_KEY_PREFIX == tenants.API_KEY_PREFIX


def test_a_line_has_its_fields_and_extras():
    entry = line("sent %d", 3, batch_id="b1")
    assert entry["msg"] == "sent 3" and entry["batch_id"] == "b1" and entry["level"] == "info"
    assert {"ts", "logger", "pid"} <= entry.keys()
    assert "trace_id" not in entry


@pytest.mark.parametrize(
    "text, hidden",
    [
        ("550 <jane.doe+x@mail.example.com>: no such user", "jane.doe+x@mail.example.com"),
        ("to Zoë.Ü@exämple.de", "Zoë.Ü@exämple.de"),
        ("key bsk_" + "A1b2_C3-" * 5 + " refused", "A1b2_C3-A1b2_C3-"),
        ("postgresql://app:s3cr3t@db.internal:5432/x", "s3cr3t"),
    ],
)
def test_addresses_keys_and_passwords_are_scrubbed(text: str, hidden: str):
    assert hidden not in redact(text)
    for entry in (
        line(text),
        line("failed: %s", text),
        line("x", error=text, nested={"k": [text]}),
        line("x", exc=ValueError(text)),
    ):
        assert hidden not in orjson.dumps(entry).decode()


def test_a_key_prefix_and_a_plain_url_stay():
    assert redact("key bsk_abc123 revoked") == "key bsk_abc123 revoked"
    assert redact("http://127.0.0.1:8123/ping") == "http://127.0.0.1:8123/ping"


def test_scrubbing_keeps_the_line_json():
    entry = line('a\nb@c.example.org\\n"q"')
    assert entry["msg"] == 'a\n<email>\\n"q"'


def test_the_bound_fields_and_the_trace_id_are_on_the_lines_of_their_task():
    async def request(trace_id: str) -> dict:
        tracing.TRACE_ID.set(trace_id)
        tracing.bind(tenant_id="t1")
        await asyncio.sleep(0)
        return line("inside", tenant_id="explicit") | {"bound": line("again")["tenant_id"]}

    async def main() -> tuple[dict, dict]:
        first, second = await asyncio.gather(request("a" * 32), request("b" * 32))
        return first, second

    first, second = asyncio.run(main())
    assert first["trace_id"] == "a" * 32 and second["trace_id"] == "b" * 32
    assert first["tenant_id"] == "explicit" and first["bound"] == "t1"  # extra wins
    assert "trace_id" not in line("outside") and "tenant_id" not in line("outside")


@pytest.mark.parametrize(
    "header, expected",
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"),
        (" 01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x ", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
        ("garbage", None),
        (None, None),
    ],
)  # fmt: skip
def test_the_trace_id_of_a_traceparent(header: str | None, expected: str | None):
    assert tracing.trace_id_of(header) == expected


def test_what_python_writes_to_stderr_is_json_too():
    script = (
        "import threading, warnings\n"
        "from engine.logs import setup_logging\n"
        "setup_logging()\n"
        "warnings.warn('careful')\n"
        "t = threading.Thread(target=lambda: 1 / 0); t.start(); t.join()\n"
        "class Bad:\n"
        "    def __del__(self): raise RuntimeError('in del')\n"
        "Bad()\n"
        "raise KeyError('the end')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 1
    found = [orjson.loads(raw) for raw in run.stderr.splitlines()]  # each line JSON
    messages = [entry["msg"] for entry in found]
    assert any("careful" in m for m in messages)
    assert "uncaught exception in a thread" in messages
    assert any(e["msg"].startswith("Exception ignored") and "Bad" in e["object"] for e in found)
    assert messages[-1] == "uncaught exception" and "KeyError" in found[-1]["exc"]
