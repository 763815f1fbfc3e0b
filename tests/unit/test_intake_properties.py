"""Property-based tests of the intake parsers and template validation (issue 8): whatever a
client sends, the rows accepted are exactly the rows sent, and nothing raises past the
API's error mapping (``BatchSenderError``: a 4xx with the SPEC body)."""

from __future__ import annotations

import asyncio
import csv
import io
import math
from collections.abc import AsyncIterator
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.body import parse_json
from engine.errors import BatchSenderError
from engine.intake.decoders import BadRow, csv_rows, ndjson_rows
from engine.templates import BatchTemplate

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(coroutine: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coroutine)


async def pieces(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    """``data`` cut at the given offsets, as a client's packets might be."""
    last = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[last:cut]
        last = cut
    yield data[last:]


async def collect(blocks: AsyncIterator[list[Any]]) -> list[Any]:
    return [row async for block in blocks for row in block]


# Any text a spreadsheet could hold in a cell, quotes, separators and line breaks included.
_cell = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
_cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


@FAST
@given(
    rows=st.lists(st.tuples(_cell, _cell, _cell), max_size=25),
    cuts=_cuts,
    crlf=st.booleans(),
)
def test_csv_written_by_a_csv_writer_is_read_back_row_for_row(
    rows: list[tuple[str, str, str]], cuts: list[int], crlf: bool
) -> None:
    buffer = io.StringIO()
    # RFC 4180: a field with a line break is quoted (with a bare LF terminator, a CR in a
    # field would not be, so such files quote every field).
    if crlf:
        writer = csv.writer(buffer, lineterminator="\r\n")
    else:
        writer = csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(["email", "name", "note"])
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    parsed = run(collect(csv_rows(pieces(data, cuts))))
    expected = [{"email": e, "name": n or None, "vars": {"note": v}} for e, n, v in rows]
    assert parsed == expected


@FAST
@given(data=st.binary(max_size=400), cuts=_cuts)
def test_any_bytes_as_csv_give_rows_or_a_client_error(data: bytes, cuts: list[int]) -> None:
    try:
        rows = run(collect(csv_rows(pieces(b"email,name\n" + data, cuts))))
    except BatchSenderError as exc:
        assert 400 <= exc.status < 500
        return
    assert all(isinstance(r, dict | BadRow) for r in rows)
    # Every record is one row: never more rows than lines (LF, CRLF or a bare CR).
    assert len(rows) <= data.count(b"\n") + data.count(b"\r") + 1


_json_scalar = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10)
_json_scalar |= st.floats(allow_nan=False, allow_infinity=False)
_json = st.recursive(
    _json_scalar,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@FAST
@given(
    items=st.lists(st.dictionaries(st.text(max_size=6), _json, max_size=4), max_size=30), cuts=_cuts
)
def test_ndjson_lines_are_read_back_one_row_each(
    items: list[dict[str, Any]], cuts: list[int]
) -> None:
    data = b"\n".join(orjson.dumps(item) for item in items)
    rows = run(collect(ndjson_rows(pieces(data, cuts))))
    nul = [orjson.dumps(i).find(b"\\u0000") >= 0 for i in items]
    assert len(rows) == len(items)
    for row, item, has_nul in zip(rows, items, nul, strict=True):
        assert row == (BadRow("contains a NUL character (\\u0000)") if has_nul else item)


@FAST
@given(data=st.binary(max_size=400), cuts=_cuts)
def test_any_bytes_as_ndjson_give_rows_or_a_client_error(data: bytes, cuts: list[int]) -> None:
    try:
        rows = run(collect(ndjson_rows(pieces(data, cuts))))
    except BatchSenderError as exc:
        assert 400 <= exc.status < 500
        return
    lines = [line for line in data.split(b"\n") if line.strip()]
    assert len(rows) == len(lines)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


@FAST
@given(value=_json)
def test_json_bodies_parse_in_steps_to_what_orjson_reads(value: Any) -> None:
    data = orjson.dumps(value)
    assert _same(run(parse_json(data)), orjson.loads(data))


@FAST
@given(data=st.binary(max_size=300))
def test_any_bytes_as_json_give_a_value_or_a_client_error(data: bytes) -> None:
    try:
        run(parse_json(data))
    except BatchSenderError as exc:
        assert exc.status == 400


_TOKENS = [*"{}%#-+*~/()[]|.,'\"=<> \n", "name", "x", "for", "in", "if", "endif", "endfor",
           "range", "9", "**", "set", "macro", "loop", "upper", "join"]  # fmt: skip
_template_text = st.lists(st.sampled_from(_TOKENS), max_size=40).map("".join)


@FAST
@given(source=_template_text)
def test_any_template_compiles_or_is_a_validation_error(source: str) -> None:
    try:
        template = BatchTemplate(source, source, source)
    except BatchSenderError as exc:
        assert exc.status == 422
        return
    try:  # rendering may fail for a recipient (the worker fails that recipient), not hang
        template.render("a@example.com", "Ann", {"x": [1, 2]})
    except Exception:  # noqa: BLE001 - any template error is the recipient's failure
        pass
