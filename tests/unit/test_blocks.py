"""engine.blocks: a flush's recipients by block, checked against the plain definition."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.blocks import BLOCK, by_block

BATCHES = sorted(str(uuid.uuid4()) for _ in range(3))


def plain(batch_ids: list[str], seqs: list[int]) -> dict[tuple[str, int], list[int]]:
    """Per (batch, block), the positions of each recipient's first result, by seq."""
    first: dict[tuple[str, int], int] = {}
    for position, key in enumerate(zip(batch_ids, seqs, strict=True)):
        first.setdefault(key, position)
    grouped: dict[tuple[str, int], list[int]] = {}
    for (batch, seq), position in sorted(first.items()):
        grouped.setdefault((batch, (seq - 1) // BLOCK), []).append(position)
    return grouped


def bits_of(seqs: list[int]) -> int:
    """A block's bits written out as PostgreSQL shows them: bit 0 first."""
    text = ["0"] * BLOCK
    for seq in seqs:
        text[(seq - 1) % BLOCK] = "1"
    return int("".join(text), 2)


# Results as flushes hold them: runs of consecutive seqs (a chunk), a few stray ones,
# repeats (a chunk sent again), several batches, in any order.
runs = st.tuples(st.sampled_from(BATCHES), st.integers(1, 5000), st.integers(1, 300))
flushes = st.lists(
    st.one_of(runs, st.tuples(st.sampled_from(BATCHES), st.integers(1, 5000), st.just(1))),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(flushes)
def test_blocks_are_the_first_result_per_recipient_in_key_order(
    parts: list[tuple[str, int, int]],
) -> None:
    batch_ids = [batch for batch, first, n in parts for _ in range(n)]
    seqs = [seq for _, first, n in parts for seq in range(first, first + n)]
    flush = by_block(batch_ids, seqs)
    expected = plain(batch_ids, seqs)
    got = {}
    for i, start, end in flush.spans():
        got[(flush.batch_ids[i], flush.blocks[i])] = flush.positions[start:end]
        block_seqs = [seqs[p] for p in flush.positions[start:end]]
        assert flush.bits[i] == bits_of(block_seqs)
    assert got == expected
    assert list(got) == sorted(expected)  # the order writers lock blocks in


def test_one_batch_id_written_two_ways_is_one_batch() -> None:
    batch = BATCHES[0]
    flush = by_block([batch, batch.upper(), batch], [5, 5, 1029])
    assert flush.batch_ids == [batch, batch]
    assert flush.blocks == [0, 1]
    assert flush.positions == [0, 2]


def test_a_block_that_is_not_one_run() -> None:
    flush = by_block([BATCHES[0]] * 3, [1024, 1, 3])
    assert flush.positions == [1, 2, 0]
    assert flush.bits == [bits_of([1, 3, 1024])]


@pytest.mark.parametrize(
    ("batch_ids", "seqs", "reason"),
    [
        ([BATCHES[0]], [0], "seq outside"),
        ([BATCHES[0]], [2**31], "seq outside"),
        ([BATCHES[0], BATCHES[0]], [1, "two"], "no integer"),
        (["not-a-uuid"], [1], "hexadecimal UUID"),
        ([BATCHES[0], 7], [1, 2], "no uuid"),
    ],
)
def test_values_no_recipient_has_are_refused(
    batch_ids: list[object], seqs: list[object], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        by_block(batch_ids, seqs)  # type: ignore[arg-type]
