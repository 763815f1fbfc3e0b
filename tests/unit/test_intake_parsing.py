"""engine.intake without services: addresses, batch fields, CSV/NDJSON streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from engine.errors import BadRequest, ValidationError
from engine.intake.decoders import (
    BadRow,
    csv_rows,
    list_rows,
    ndjson_rows,
    parse_json_request,
    split_ndjson_header,
)
from engine.intake.fields import fields_from_query, parse_batch_fields, valid_email

# --- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "a@example.com",
        "first.last+tag@sub.example.co.uk",
        "o'brien@example.ie",
        "user_name-1@ex-ample.com",
        "x@a.io",
        "UPPER@EXAMPLE.COM",
        "a" * 64 + "@example.com",
    ],
)
def test_valid_addresses(address: str) -> None:
    assert valid_email(address)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "plain",
        "@example.com",
        "a@",
        "a@localhost",  # no dot in the domain
        "a@-example.com",
        "a@example-.com",
        "a@example..com",
        "a b@example.com",
        "a@example.com ",
        " a@example.com",
        "a@exa mple.com",
        "a@@example.com",
        "a@b@example.com",
        "a" * 65 + "@example.com",  # local part over 64
        "a@" + "b" * 64 + ".com",  # label over 63
        "a@" + ".".join(["b" * 60] * 5) + ".com",  # over 254 in all
        "a@example.com\n",
    ],
)
def test_invalid_addresses(address: str) -> None:
    assert not valid_email(address)


@pytest.mark.parametrize("value", [None, 5, ["a@example.com"], b"a@example.com"])
def test_non_strings_are_not_addresses(value: Any) -> None:
    assert not valid_email(value)


# --- batch fields ------------------------------------------------------------------------

GOOD = {
    "name": "Spring sale",
    "from_email": "news@shop.example",
    "subject": "Hi {{ name }}",
    "html": "<p>{{ offer }}</p>",
    "provider": "mock",
}


def field_errors(data: Any, **kwargs: Any) -> list[dict[str, Any]]:
    with pytest.raises(ValidationError) as caught:
        parse_batch_fields(data, **kwargs)
    error = caught.value
    assert error.status == 422
    assert error.message  # a human sentence naming the first problem
    return error.details["errors"]


def fields_of(errors: list[dict[str, Any]]) -> list[str]:
    return [e["field"] for e in errors]


def test_good_fields() -> None:
    spec = parse_batch_fields({**GOOD, "from_name": "Shop", "text": "x", "metadata": {"k": 1}})
    assert (spec.name, spec.from_email, spec.from_name) == (
        "Spring sale",
        GOOD["from_email"],
        "Shop",
    )
    assert spec.provider == "mock"
    assert spec.html == GOOD["html"] and spec.text == "x"
    assert spec.metadata == {"k": 1}
    assert spec.scheduled_at is None and spec.dry_run is False and spec.draft is False
    assert spec.template.required_vars == {"offer"}


def test_query_parameter_style_strings_are_converted() -> None:
    spec = parse_batch_fields(
        fields_from_query({**GOOD, "dry_run": "true", "draft": "0", "metadata": '{"campaign": 7}',
                           "scheduled_at": "2031-02-03T04:05:06Z"}),
        allow_recipients=False,
    )  # fmt: skip
    assert spec.dry_run is True and spec.draft is False
    assert spec.metadata == {"campaign": 7}
    assert spec.scheduled_at == datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)


def test_scheduled_at_without_zone_is_utc_and_offsets_are_kept() -> None:
    naive = parse_batch_fields({**GOOD, "scheduled_at": "2031-02-03T04:05:06"})
    assert naive.scheduled_at == datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    offset = parse_batch_fields({**GOOD, "scheduled_at": "2031-02-03T04:05:06+02:00"})
    assert offset.scheduled_at == datetime(2031, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))


@pytest.mark.parametrize("body", [None, [], "text", 5, [GOOD]])
def test_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_batch_fields(body)
    assert caught.value.code == "invalid_body"


def test_required_fields() -> None:
    errors = field_errors({})
    assert fields_of(errors) == ["name", "from_email", "subject", "html", "provider"]
    assert {e["message"] for e in errors if e["field"] != "html"} == {"is required"}
    assert "html or text" in errors[3]["message"]


def test_text_alone_is_enough() -> None:
    data = {k: v for k, v in GOOD.items() if k != "html"} | {"text": "hello"}
    assert parse_batch_fields(data).text == "hello"


def test_unknown_field() -> None:
    errors = field_errors({**GOOD, "colour": "red", "priority": 1})
    assert errors == [
        {"field": "colour", "message": "unknown field"},
        {"field": "priority", "message": "unknown field"},
    ]


def test_recipients_is_unknown_where_not_allowed() -> None:
    parse_batch_fields({**GOOD, "recipients": []})  # allowed in a JSON body
    errors = field_errors({**GOOD, "recipients": []}, allow_recipients=False)
    assert errors == [{"field": "recipients", "message": "unknown field"}]


def test_unknown_provider() -> None:
    errors = field_errors({**GOOD, "provider": "pigeon"})
    assert fields_of(errors) == ["provider"]
    assert errors[0]["message"].startswith("unknown provider")
    assert "mock" in errors[0]["message"]


@pytest.mark.parametrize(
    "provider", ["mock", "smtp", "ses", "sendgrid", "mailgun", "postmark", "resend"]
)
def test_available_providers(provider: str) -> None:
    assert parse_batch_fields({**GOOD, "provider": provider}).provider == provider


def test_a_provider_account_may_stand_for_the_provider() -> None:
    fields = {key: value for key, value in GOOD.items() if key != "provider"}
    spec = parse_batch_fields({**fields, "provider_account": "marketing-eu"})
    assert (spec.provider, spec.provider_account) == ("", "marketing-eu")
    assert field_errors(fields) == [{"field": "provider", "message": "is required"}]
    errors = field_errors({**GOOD, "provider_account": "x" * 101})
    assert errors == [{"field": "provider_account", "message": "must be at most 100 characters"}]


@pytest.mark.parametrize("when", ["tomorrow", "2031-13-01T00:00:00", "", "12:00"])
def test_bad_scheduled_at(when: str) -> None:
    errors = field_errors({**GOOD, "scheduled_at": when})
    assert errors == [{"field": "scheduled_at", "message": "must be an ISO 8601 date-time"}]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", 5, "must be a string"),
        ("from_email", ["a@example.com"], "must be a string"),
        ("from_name", {"x": 1}, "must be a string"),
        ("subject", True, "must be a string"),
        ("html", 1.5, "must be a string"),
        ("text", [], "must be a string"),
        ("provider", 1, "must be a string"),
        ("dry_run", "maybe", "must be true or false"),
        ("dry_run", 1, "must be true or false"),
        ("draft", None, "must be true or false"),
        ("metadata", [1, 2], "must be a JSON object"),
        ("metadata", "not json", "must be a JSON object"),
        ("metadata", "[1]", "must be a JSON object"),
        ("metadata", 5, "must be a JSON object"),
        ("name", "   ", "must not be empty"),
        ("subject", "", "must not be empty"),
        ("name", "n" * 201, "must be at most 200 characters"),
        ("from_email", "not-an-address", "is not a valid e-mail address"),
    ],
)
def test_field_errors(field: str, value: Any, message: str) -> None:
    errors = field_errors({**GOOD, field: value})
    assert {"field": field, "message": message} in errors
    assert set(fields_of(errors)) == {field}


def test_every_error_is_reported_at_once() -> None:
    errors = field_errors(
        {"name": 1, "from_email": "x", "subject": "s", "text": "t", "provider": "pigeon",
         "dry_run": "?", "scheduled_at": "soon", "extra": 1}
    )  # fmt: skip
    assert sorted(fields_of(errors)) == sorted(
        ["extra", "name", "from_email", "provider", "scheduled_at", "dry_run"]
    )


def test_template_syntax_error_in_fields() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_batch_fields({**GOOD, "subject": "{{ broken"})
    assert caught.value.code == "invalid_template"


async def test_parse_json_request() -> None:
    recipients = [{"email": "a@example.com"}, {"email": "b@example.com", "vars": {"offer": 1}}]
    spec, rows = parse_json_request(orjson.dumps({**GOOD, "recipients": recipients}))
    assert spec.name == GOOD["name"]
    assert await collect(rows) == recipients


@pytest.mark.parametrize("body", [b"{", b"", b"nope", b'{"name": }'])
def test_parse_json_request_malformed(body: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_json_request(body)
    assert caught.value.code == "invalid_json"
    assert caught.value.status == 400


@pytest.mark.parametrize("recipients", [None, "a@example.com", {"email": "a@example.com"}])
def test_parse_json_request_recipients_must_be_a_list(recipients: Any) -> None:
    body = {**GOOD}
    if recipients is not None:
        body["recipients"] = recipients
    with pytest.raises(ValidationError) as caught:
        parse_json_request(orjson.dumps(body))
    assert caught.value.details == {"field": "recipients"}


async def test_parse_json_request_draft_may_omit_recipients() -> None:
    spec, rows = parse_json_request(orjson.dumps({**GOOD, "draft": True}))
    assert spec.draft is True
    assert [row async for row in rows] == []


# --- streams -----------------------------------------------------------------------------


async def stream(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def collect(blocks: AsyncIterator[list[Any]]) -> list[Any]:
    """The rows of all blocks, in order (sources yield rows in blocks)."""
    return [row async for block in blocks for row in block]


CSV = (
    "email,name,offer,city\n"
    "ann@example.com,Ann,10%,Oslo\n"
    'bob@example.com,,"2 for 1, today",Bergen\n'
    "chloé@example.com,Chloé,–,Tromsø\n"
).encode()
CSV_ROWS = [
    {"email": "ann@example.com", "name": "Ann", "vars": {"offer": "10%", "city": "Oslo"}},
    {
        "email": "bob@example.com",
        "name": None,
        "vars": {"offer": "2 for 1, today", "city": "Bergen"},
    },
    {"email": "chloé@example.com", "name": "Chloé", "vars": {"offer": "–", "city": "Tromsø"}},
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 13, 29, 1 << 20])
async def test_csv_rows_split_anywhere(size: int) -> None:
    # Sizes 1-3 split multi-byte characters and every line in the middle.
    assert await collect(csv_rows(stream(split_every(CSV, size)))) == CSV_ROWS


async def test_csv_rows_crlf_blank_lines_and_no_final_newline() -> None:
    data = b"name,email\r\n\r\nAnn,ann@example.com\r\n\r\nBob,bob@example.com"
    rows = await collect(csv_rows(stream([data[:15], b"", data[15:]])))
    assert rows == [
        {"email": "ann@example.com", "name": "Ann", "vars": None},
        {"email": "bob@example.com", "name": "Bob", "vars": None},
    ]


async def test_csv_header_is_trimmed_and_email_column_may_be_anywhere() -> None:
    rows = await collect(csv_rows(stream([b" code , email \nX1,a@example.com\n"])))
    assert rows == [{"email": "a@example.com", "name": None, "vars": {"code": "X1"}}]


async def test_csv_without_email_column() -> None:
    with pytest.raises(ValidationError) as caught:
        await collect(csv_rows(stream([b"mail,name\na@example.com,A\n"])))
    assert caught.value.code == "invalid_csv"


async def test_csv_column_count_mismatch_is_a_bad_row() -> None:
    data = b"email,name\na@example.com,A\nb@example.com\nc@example.com,C,extra\nd@example.com,D\n"
    rows = await collect(csv_rows(stream(split_every(data, 5))))
    assert len(rows) == 4
    assert rows[0]["email"] == "a@example.com" and rows[3]["email"] == "d@example.com"
    assert rows[1] == BadRow("has 1 columns, the header has 2")
    assert rows[2] == BadRow("has 3 columns, the header has 2")


async def test_csv_not_utf8() -> None:
    with pytest.raises(BadRequest) as caught:
        await collect(csv_rows(stream([b"email\n\xff\xfe@example.com\n"])))
    assert caught.value.code == "invalid_csv"


async def test_csv_empty_body_has_no_rows() -> None:
    assert await collect(csv_rows(stream([]))) == []
    assert await collect(csv_rows(stream([b"email,name\n"]))) == []


NDJSON_ITEMS = [
    {"email": "ann@example.com", "name": "Ann", "vars": {"offer": "10%", "note": "a\nb"}},
    {"email": "bøb@example.com"},
    {"email": "c@example.com", "vars": {"emoji": "📧"}},
]
NDJSON = b"".join(orjson.dumps(item) + b"\n" for item in NDJSON_ITEMS)


@pytest.mark.parametrize("size", [1, 2, 5, 11, 64, 1 << 20])
async def test_ndjson_rows_split_anywhere(size: int) -> None:
    assert await collect(ndjson_rows(stream(split_every(NDJSON, size)))) == NDJSON_ITEMS


async def test_ndjson_blank_lines_crlf_and_no_final_newline() -> None:
    data = b'\n{"email": "a@example.com"}\r\n\n  \n{"email": "b@example.com"}'
    rows = await collect(ndjson_rows(stream(split_every(data, 4))))
    assert rows == [{"email": "a@example.com"}, {"email": "b@example.com"}]


async def test_ndjson_invalid_line_is_a_bad_row() -> None:
    data = b'{"email": "a@example.com"}\n{"email": \n[1, 2]\n{"email": "b@example.com"}\n'
    rows = await collect(ndjson_rows(stream(split_every(data, 9))))
    assert rows == [
        {"email": "a@example.com"},
        BadRow("not valid JSON"),
        [1, 2],  # valid JSON; the copier rejects it later as "not an object"
        {"email": "b@example.com"},
    ]


async def test_split_ndjson_header_present() -> None:
    header = {"name": "n", "provider": "mock"}
    data = orjson.dumps(header) + b"\n" + NDJSON
    found, rows = await split_ndjson_header(ndjson_rows(stream(split_every(data, 10))))
    assert found == header
    assert await collect(rows) == NDJSON_ITEMS


async def test_split_ndjson_header_absent() -> None:
    found, rows = await split_ndjson_header(ndjson_rows(stream([NDJSON])))
    assert found is None
    assert await collect(rows) == NDJSON_ITEMS  # the first row is not lost


async def test_split_ndjson_header_first_row_bad() -> None:
    found, rows = await split_ndjson_header(ndjson_rows(stream([b"nope\n" + NDJSON])))
    assert found is None
    assert await collect(rows) == [BadRow("not valid JSON"), *NDJSON_ITEMS]


async def test_split_ndjson_header_empty_stream() -> None:
    found, rows = await split_ndjson_header(ndjson_rows(stream([])))
    assert found is None
    assert await collect(rows) == []


async def test_split_ndjson_header_only() -> None:
    found, rows = await split_ndjson_header(list_rows([{"name": "only a header"}]))
    assert found == {"name": "only a header"}
    assert await collect(rows) == []


async def test_csv_quoted_field_with_an_empty_line_at_a_chunk_end_keeps_it():
    """A chunk that ends inside a quoted field right after an empty line: the empty line
    stays part of the field (found by the property test: it was dropped)."""

    async def chunks():
        yield b'email,name,note\na@b.co,,"00\n\n'
        yield b'zz"\nc@d.co,C,plain\n'

    rows = await collect(csv_rows(chunks()))
    assert rows == [
        {"email": "a@b.co", "name": None, "vars": {"note": "00\n\nzz"}},
        {"email": "c@d.co", "name": "C", "vars": {"note": "plain"}},
    ]


async def test_csv_quoted_field_may_span_lines_and_chunks():
    from engine.intake.decoders import csv_rows

    async def chunks():
        yield b'email,name,note\na@b.co,"A, x","line1\n'
        yield b'line2"\nc@d.co,C,plain\n'

    rows = await collect(csv_rows(chunks()))
    assert rows == [
        {"email": "a@b.co", "name": "A, x", "vars": {"note": "line1\nline2"}},
        {"email": "c@d.co", "name": "C", "vars": {"note": "plain"}},
    ]
