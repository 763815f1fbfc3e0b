"""engine.results: the results message codec."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest

from engine.results import ResultRow, decode, encode


def test_round_trip() -> None:
    batch_id = str(uuid.uuid4())
    rows = [
        ResultRow(batch_id, 1, "sent", "pm-1", None, 1, 42, "example.com"),
        ResultRow(batch_id, 2, "failed", None, "550 no such user", 3, 7, "example.org"),
        ResultRow(batch_id, 3, "delivered"),
    ]
    before = time.time()
    message = decode(encode("tenant-a", "mock", rows))
    assert message.tenant_id == "tenant-a"
    assert message.provider == "mock"
    assert before - 1 <= message.ts <= time.time() + 1
    assert message.rows == rows
    assert message.rows[2].attempts == 1 and message.rows[2].domain == ""


def test_round_trip_without_tenant_and_rows() -> None:
    message = decode(encode(None, "smtp", []))
    assert (message.tenant_id, message.provider, message.rows) == (None, "smtp", [])


def test_encoded_form_is_compact_lists() -> None:
    row = ResultRow("b", 5, "sent", "id", None, 2, 9, "d.example")
    body = orjson.loads(encode("t", "mock", [row]))
    assert body["r"] == [["b", 5, "sent", "id", None, 2, 9, "d.example"]]
    assert set(body) == {"t", "p", "ts", "r"}


def test_tenant_is_optional_in_the_message() -> None:
    message = decode(orjson.dumps({"p": "mock", "ts": 1.5, "r": [["b", 1, "sent"]]}))
    assert message.tenant_id is None
    assert message.ts == 1.5
    assert message.rows == [ResultRow("b", 1, "sent")]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"{",
        b"null",
        b"[]",
        b"5",
        b"{}",
        b'{"p": "mock", "ts": 1}',  # no rows
        b'{"t": "x", "ts": 1, "r": []}',  # no provider
        b'{"p": "mock", "r": []}',  # no timestamp
        b'{"p": "mock", "ts": "later", "r": []}',
        b'{"p": "mock", "ts": 1, "r": 5}',
        b'{"p": "mock", "ts": 1, "r": [["b"]]}',  # a row too short
        b'{"p": "mock", "ts": 1, "r": [["b", 1, "sent", null, null, 1, 0, "", "x"]]}',  # too long
        b'{"p": "mock", "ts": 1, "r": [5]}',
        b'{"p": "mock", "ts": 1, "r": [{"batch_id": "b"}]}',
    ],
)
def test_malformed_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode(data)
