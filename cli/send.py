"""``batchsender send``: stream a CSV/NDJSON file to the API and follow the batch."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

from engine.lifecycle import FINISHED

_TYPES = {".csv": "text/csv", ".ndjson": "application/x-ndjson", ".jsonl": "application/x-ndjson"}


async def _file_chunks(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def _bar(done: int, total: int, rate: float | None, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    shown_rate = f"{rate:,.0f}/s" if rate else "-"
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} {shown_rate}  "


async def send_file(url: str, key: str, path: Path, fields: dict[str, str], *, follow: bool) -> int:
    try:
        return await _send_file(url, key, path, fields, follow=follow)
    except aiohttp.ClientConnectorError as exc:
        from engine.services import safe_url

        refused = isinstance(exc.os_error, ConnectionRefusedError)
        reason = (
            "connection refused"
            if refused
            else (getattr(exc.os_error, "strerror", None) or str(exc))
        )
        print(
            f"batchsender: error: the API at {safe_url(url)} is not reachable ({reason})"
            " — is `batchsender api` running? ./setup-dev.sh starts it",
            file=sys.stderr,
        )
        return 69  # EX_UNAVAILABLE, as for the services (cli.main)


async def _send_file(
    url: str, key: str, path: Path, fields: dict[str, str], *, follow: bool
) -> int:
    kind = _TYPES.get(path.suffix.lower())
    if kind is None:
        print(f"batchsender: {path.name}: use a .csv, .ndjson or .jsonl file", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {key}", "Content-Type": kind}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.monotonic()
        async with session.post(
            f"{url}/api/batches", params=fields, data=_file_chunks(path), headers=headers
        ) as response:
            body = orjson.loads(await response.read())
        if response.status != 201:
            error = body.get("error", {})
            print(
                f"batchsender: {response.status} {error.get('code')}: {error.get('message')}",
                file=sys.stderr,
            )
            return 1
        print(
            f"batch {body['id']}: {body['total_recipients']:,} recipients accepted "
            f"in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
        if not follow:
            print(body["id"])
            return 0
        while True:
            async with session.get(f"{url}/api/batches/{body['id']}", headers=headers) as response:
                batch = orjson.loads(await response.read())
            progress = batch["progress"]
            sys.stderr.write(
                _bar(progress["final"], batch["total_recipients"], progress["per_second"])
            )
            sys.stderr.flush()
            if batch["status"] in FINISHED:
                counts = {k: v for k, v in batch["counts"].items() if v}
                print(f"\n{batch['status']}: {counts}", file=sys.stderr)
                print(body["id"])
                return 0 if batch["status"] == "completed" else 1
            await asyncio.sleep(0.5)
