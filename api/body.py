"""Request bodies, received before any database work and never waiting without end.

Every body is read with a deadline for each piece (``BODY_TIMEOUT_SECONDS``) and, once
that long has passed, a minimum average rate (``BODY_MIN_RATE`` bytes/s): a client that
stalls or trickles gets 408 and frees what it held. A JSON body is kept in memory (at
most ``MAX_BODY_BYTES``) and parsed in 64 KiB steps, so even a large one never holds
the event loop for more than a few milliseconds. A streamed upload (CSV, NDJSON) is
spooled to a temporary file (memory first, disk past 8 MiB; at most
``MAX_UPLOAD_BYTES``) and handed on only when complete, so intake's COPY never waits for
the client while it holds a database connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import AsyncIterator
from typing import IO, Any

import ijson
from aiohttp import web

from engine.config import Settings
from engine.errors import BadRequest, PayloadTooLarge, RequestTimeout

_PARSE_STEP = 64 << 10
_SPOOL_MEMORY = 8 << 20
BLOCK = 256 << 10  # what a spooled upload is handed on in (one block of rows at a time)


async def _pieces(request: web.Request, settings: Settings, limit: int) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive, within the deadlines and ``limit``."""
    idle, min_rate = settings.body_timeout_seconds, settings.body_min_rate
    loop = asyncio.get_running_loop()
    started, total = loop.time(), 0
    while True:
        try:  # wait_for, not asyncio.timeout: under a timeout scope a client that went
            # away ended the handler as a cancellation, not as the ConnectionResetError the
            # error middleware logs as one line (tests/integration/test_http_errors.py)
            piece = await asyncio.wait_for(request.content.readany(), idle)
        except TimeoutError:
            raise RequestTimeout(
                f"no part of the body arrived for {idle:g} s", code="body_timeout"
            ) from None
        if not piece:
            return
        total += len(piece)
        if total > limit:
            raise PayloadTooLarge(
                f"the body is larger than {limit} bytes; stream NDJSON or CSV instead"
                if limit == settings.max_body_bytes
                else f"the upload is larger than {limit} bytes",
                {"limit": limit},
            )
        elapsed = loop.time() - started
        if elapsed > idle and total < min_rate * elapsed:
            raise RequestTimeout(
                f"the body arrives slower than {min_rate} bytes/s", code="body_too_slow"
            )
        yield piece


async def read_bytes(request: web.Request, settings: Settings) -> bytes:
    """The whole body (at most ``MAX_BODY_BYTES``)."""
    return b"".join([piece async for piece in _pieces(request, settings, settings.max_body_bytes)])


async def parse_json(data: bytes) -> Any:
    """JSON in steps that each take a few milliseconds; ``BadRequest`` when it is not JSON.
    (One orjson call is faster, but holds the loop for about 16 ms per MiB.)"""
    found = ijson.sendable_list()
    parser = ijson.items_coro(found, "", use_float=True)
    try:
        for start in range(0, len(data), _PARSE_STEP):
            parser.send(data[start : start + _PARSE_STEP])
            await asyncio.sleep(0)
        parser.close()
    except ijson.JSONError as exc:
        message = str(exc).split("\n", 1)[0]
        raise BadRequest(f"the body is not valid JSON: {message}", code="invalid_json") from None
    if not found:
        raise BadRequest("the body is not valid JSON: it is empty", code="invalid_json")
    return found[0]


async def read_json(request: web.Request, settings: Settings) -> tuple[Any, bytes]:
    """The body parsed as JSON, and its bytes."""
    data = await read_bytes(request, settings)
    return await parse_json(data), data


class Spool:
    """A whole streamed upload, received; ``digest`` is its sha256 when asked for (what an
    Idempotency-Key is bound to)."""

    def __init__(self, file: IO[bytes], size: int, digest: bytes | None):
        self._file = file
        self.size = size
        self.digest = digest

    async def blocks(self) -> AsyncIterator[bytes]:
        """The upload again, ``BLOCK`` bytes at a time (from memory or the page cache)."""
        self._file.seek(0)
        while block := self._file.read(BLOCK):
            yield block

    def close(self) -> None:
        self._file.close()


async def spool(request: web.Request, settings: Settings, *, digest: bool) -> Spool:
    """Receive a streamed upload completely before anything is parsed or stored (hashing
    it costs about 1 ms per MiB, so only when ``digest``)."""
    file = tempfile.SpooledTemporaryFile(_SPOOL_MEMORY, dir=settings.upload_dir or None)
    hasher = hashlib.sha256() if digest else None
    size = 0
    try:
        async for piece in _pieces(request, settings, settings.max_upload_bytes):
            file.write(piece)
            size += len(piece)
            if hasher is not None:
                hasher.update(piece)
    except BaseException:
        file.close()
        raise
    return Spool(file, size, hasher.digest() if hasher is not None else None)
