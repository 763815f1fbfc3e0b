"""engine.results: the results message codec."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest

from engine.results import Columns, ResultRow, decode, encode, tenant_of


def test_round_trip() -> None:
    batch_id = str(uuid.uuid4())
    rows = [
        ResultRow(batch_id, 1, "sent", "pm-1", None, 1, 42, "example.com"),
        ResultRow(batch_id, 2, "failed", None, "550 no such user", 3, 7, "example.org"),
        ResultRow(batch_id, 3, "delivered"),
    ]
    before = time.time()
    message = decode(encode("tenant-a", "mock", Columns.from_rows(rows)))
    assert message.tenant_id == "tenant-a"
    assert message.provider == "mock"
    assert before - 1 <= message.ts <= time.time() + 1
    assert message.rows == rows
    assert message.rows[2].attempts == 1 and message.rows[2].domain == ""


def test_round_trip_without_tenant_and_rows() -> None:
    message = decode(encode(None, "smtp", Columns()))
    assert (message.tenant_id, message.provider, message.rows) == (None, "smtp", [])


def test_encoded_form_is_compact_columns() -> None:
    rows = [ResultRow("b", 5, "sent", "id", None, 2, 9, "d.example"), ResultRow("b", 6, "failed")]
    body = orjson.loads(encode("t", "mock", Columns.from_rows(rows)))
    assert body["b"] == "b"  # one batch: its id once, not per row
    assert body["s"] == [5, 6] and body["st"] == ["sent", "failed"]
    assert set(body) == {"t", "p", "ts", "b", "s", "st", "pm", "er", "at", "ms", "d"}


def test_a_column_of_one_value_is_sent_once_and_read_for_every_row() -> None:
    columns = Columns()
    for seq in range(1, 101):  # a provider call: all sent, one latency, no error
        columns.append("b", seq, "sent", provider_message_id=f"pm-{seq}", latency_ms=20,
                       domain="example.com")  # fmt: skip
    wire = encode("t", "mock", columns)
    body = orjson.loads(wire)
    assert (body["st"], body["er"], body["at"], body["ms"], body["d"]) == (
        "sent", None, 1, 20, "example.com",
    )  # fmt: skip
    assert body["s"] == list(range(1, 101)) and len(body["pm"]) == 100
    assert decode(wire).columns == columns
    single = Columns.from_rows([ResultRow("b", 7, "sent")])
    assert orjson.loads(encode("t", "mock", single))["s"] == [7]  # seqs: always a list
    assert decode(encode("t", "mock", single)).columns == single


def test_seqs_that_are_no_list_are_no_results_message() -> None:
    wire = {"p": "mock", "ts": 1.5, "b": "b", "s": "123", "st": "sent", "pm": None,
            "er": None, "at": 1, "ms": 0, "d": ""}  # fmt: skip
    with pytest.raises(ValueError, match="not a results message"):
        decode(orjson.dumps(wire))


def test_results_of_several_batches_keep_an_id_per_row() -> None:
    rows = [ResultRow("a", 1, "delivered"), ResultRow("b", 1, "bounced")]
    body = orjson.loads(encode(None, "mock", Columns.from_rows(rows)))
    assert body["b"] == ["a", "b"]
    assert decode(orjson.dumps(body)).rows == rows


def test_tenant_is_optional_in_the_message() -> None:
    wire = {"p": "mock", "ts": 1.5, "b": "b", "s": [1], "st": ["sent"], "pm": [None],
            "er": [None], "at": [1], "ms": [0], "d": [""]}  # fmt: skip
    message = decode(orjson.dumps(wire))
    assert message.tenant_id is None
    assert message.ts == 1.5
    assert message.rows == [ResultRow("b", 1, "sent")]


def test_the_tenant_is_read_from_the_first_bytes_as_decode_reads_it() -> None:
    rows = Columns.from_rows([ResultRow("b", 1, "sent")])
    for tenant in ("tenant-a", "t", "a_b-0", None):
        data = encode(tenant, "mock", rows)
        assert tenant_of(data) == decode(data).tenant_id == tenant
    # Not as encode begins a message: decode it to know (None here).
    assert tenant_of(b'{"p": "mock", "t": "x"}') is None
    assert tenant_of(b'{"t":""}') is None
    assert tenant_of(b"") is None


_GOOD = {"p": "mock", "ts": 1, "b": "b", "s": [1], "st": ["sent"], "pm": [None], "er": [None],
         "at": [1], "ms": [0], "d": [""]}  # fmt: skip


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
        orjson.dumps({k: v for k, v in _GOOD.items() if k != "p"}),  # no provider
        orjson.dumps({k: v for k, v in _GOOD.items() if k != "ts"}),  # no timestamp
        orjson.dumps({k: v for k, v in _GOOD.items() if k != "st"}),  # a column missing
        orjson.dumps({**_GOOD, "ts": "later"}),
        orjson.dumps({**_GOOD, "s": 5}),
        orjson.dumps({**_GOOD, "st": ["sent", "sent"]}),  # columns of different lengths
        orjson.dumps({**_GOOD, "b": ["a", "b"]}),
    ],
)
def test_malformed_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode(data)


@pytest.mark.parametrize("keep", [[], [2], [0, 2], [3, 1, 1], list(range(5))])
def test_select_keeps_the_rows_at_the_positions_given_in_their_order(keep: list[int]) -> None:
    columns = Columns()
    for seq in range(5):
        columns.append(f"b{seq % 2}", seq, "sent", provider_message_id=f"pm{seq}", domain="x")
    rows = columns.rows()
    selected = columns.select(keep)
    assert selected.rows() == [rows[i] for i in keep]
    assert all(type(getattr(selected, name)) is list for name in ("seq", "batch_id", "error"))
