"""Request bodies as blocks of recipient rows: JSON, NDJSON and CSV (RFC 4180).

Bytes are re-cut at line ends and decoded many lines at a time, so a 1,000,000-recipient
upload never sits in memory; a line that cannot be read becomes a ``BadRow`` (named by
its recipient number later) or, where the format itself is broken, a ``BadRequest``
naming the line.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from engine.errors import BadRequest, ValidationError
from engine.intake.fields import BatchSpec, has_nul, parse_batch_fields

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
                    {"line": line},
                    code="line_too_long",
                )
            continue
        text = b"".join((*pieces, chunk[:cut])) if pieces else chunk[:cut]
        pieces, pending = [chunk[cut + 1 :]], len(chunk) - cut - 1
        yield line, text
        line += text.count(b"\n") + 1
    rest = b"".join(pieces)
    if rest.strip():
        yield line, rest


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
            block = [BadRow(_NUL_ROW) if has_nul(row) else row for row in block]
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
                block.append(
                    {
                        "email": values[email_at],
                        "name": values[name_at] if name_at >= 0 and values[name_at] else None,
                        "vars": {h: values[i] for i, h in var_cols} if var_cols else None,
                    }
                )
        except csv.Error as exc:
            line = start + done  # where the record that failed begins
            if str(exc) != "unexpected end of data":
                raise _csv_error(line, str(exc)) from None
            # The rest of the block from the line where that record begins, exactly (an
            # empty last line included: readlines() would not show it).
            read = io.StringIO(text, newline="").readlines()[:done]
            carry = text[sum(map(len, read)) :]
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


def parse_json_request(data: bytes) -> tuple[BatchSpec, AsyncIterator[Any]]:
    """A whole create request as JSON (REST body or NATS message): fields and recipients."""
    return json_request(json_body(data), data)


def json_body(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None


def json_request(body: Any, data: bytes) -> tuple[BatchSpec, AsyncIterator[Any]]:
    """``parse_json_request`` of a body already parsed (``data``, its JSON)."""
    spec = parse_batch_fields(body)
    return spec, json_rows(body.get("recipients", [] if spec.draft else None), data)


def json_rows(recipients: Any, data: bytes) -> AsyncIterator[list[Any]]:
    """The recipients list of a JSON body ``data`` as blocks of rows; a recipient holding
    a NUL character becomes a ``BadRow`` (looked for only when the body has one)."""
    if not isinstance(recipients, list):
        raise ValidationError("recipients: must be a list", {"field": "recipients"})
    if b"\\u0000" in data:
        recipients = [BadRow(_NUL_ROW) if has_nul(r) else r for r in recipients]
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
