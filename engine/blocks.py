"""A flush's recipients by block of final bits, grouped here rather than in SQL.

A batch's recipients are kept in blocks of ``BLOCK`` (``engine.lifecycle``): recipient
``seq`` is bit ``(seq - 1) & 1023`` of block ``(seq - 1) >> 10``, one row of bits per block
(``recipient_finals``). A status write hands PostgreSQL one value per block (the block's
bits as one ``bit(1024)``, its recipients as slices of flat arrays) instead of one row per
recipient to unnest, sort, group and rank: PostgreSQL's executor costs microseconds per
row, the grouping here a tenth of one (a sort of the flush's keys, at C speed, and
arithmetic per block: a block's recipients are mostly one run of seqs).

``by_block`` keeps each recipient's first result only, orders them by (batch, seq), the
order in which every writer takes the blocks' rows, and makes each block's bits.
"""

from __future__ import annotations

import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from asyncpg import BitString

BLOCK = 1024  # recipients per block: the bits of one row of recipient_finals
MAX_SEQ = 2**31 - 1  # recipients.seq is an int4
_SEQ_BITS = 32  # a key is (batch's rank << 32) | seq


def bit(seq: int) -> int:
    """The bit of a recipient in its block's bits (as an int; bit 0 is the highest)."""
    return 1 << (BLOCK - 1 - ((seq - 1) & (BLOCK - 1)))


def bits(value: int) -> BitString:
    """A block's bits as PostgreSQL's ``bit(1024)``."""
    return BitString.from_int(value, BLOCK)


@dataclass(slots=True)
class Blocks:
    """The first result per recipient of a flush, by (batch, seq), cut into blocks.

    ``positions``: where each of them is in the flush, ``keys`` their (batch, seq) keys in
    the same order. Per block ``i``: ``batch_ids[i]`` (canonical uuid text), ``blocks[i]``,
    ``bits[i]`` (its recipients' bits), and its recipients at ``starts[i]:ends[i]``.
    """

    positions: list[int]
    keys: list[int]
    batch_ids: list[str]
    blocks: list[int]
    starts: list[int]
    ends: list[int]
    bits: list[int]

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """(block index, start, end) of each block."""
        return zip(range(len(self.blocks)), self.starts, self.ends, strict=True)

    def mask(self, start: int, end: int, keep: Callable[[int], bool]) -> int:
        """The bits of the recipients at ``start:end`` whose position ``keep`` takes."""
        chosen = zip(self.positions[start:end], self.keys[start:end], strict=True)
        return _bits_of(key for position, key in chosen if keep(position))

    def taken(self, start: int, end: int, new: int, all_of_block: int) -> list[int]:
        """The positions at ``start:end`` whose bit is set in ``new`` (a block's bits)."""
        if new == all_of_block:
            return self.positions[start:end]
        return [
            position
            for position, key in zip(self.positions[start:end], self.keys[start:end], strict=True)
            if new & bit(key)
        ]


def by_block(batch_ids: Sequence[str], seqs: Sequence[int]) -> Blocks:
    """Group a flush's results (one batch id and seq each, at least one) by block.

    ``ValueError`` when a batch id is no uuid, a seq no integer or one outside 1..2**31-1
    (an int4; no recipient has it).
    """
    n = len(seqs)
    try:
        if min(seqs) < 1 or max(seqs) > MAX_SEQ:
            raise ValueError(f"a seq outside 1..{MAX_SEQ} (int32)")
    except TypeError:
        raise ValueError("a seq that is no integer") from None
    if batch_ids.count(batch_ids[0]) == n:  # the common flush: one batch
        ids = [_canonical(batch_ids[0])]
        keys = list(seqs)
    else:  # ranked in PostgreSQL's uuid order (that of their canonical text)
        canonical = {b: _canonical(b) for b in set(batch_ids)}
        ids = sorted(set(canonical.values()))
        rank = {c: i << _SEQ_BITS for i, c in enumerate(ids)}
        keys = [rank[canonical[b]] | s for b, s in zip(batch_ids, seqs, strict=True)]
    positions = sorted(range(n), key=keys.__getitem__)  # stable: a recipient's first first
    keys = [keys[p] for p in positions]
    if len(set(keys)) < n:
        positions, keys = _firsts(positions, keys)
    blocks = Blocks(positions, keys, [], [], [], [], [])
    start, total = 0, len(keys)
    while start < total:
        first = keys[start]
        block_key = (first - 1) >> 10  # (batch's rank << 22) | block
        end = bisect_left(keys, ((block_key + 1) << 10) + 1, start)
        last = keys[end - 1]
        if last - first == end - 1 - start:  # one run of seqs
            value = ((1 << (last - first + 1)) - 1) * bit(last)
        else:
            value = _bits_of(keys[start:end])
        blocks.batch_ids.append(ids[first >> _SEQ_BITS])
        blocks.blocks.append(block_key & ((1 << (_SEQ_BITS - 10)) - 1))
        blocks.starts.append(start)
        blocks.ends.append(end)
        blocks.bits.append(value)
        start = end
    return blocks


def _bits_of(keys: Iterable[int]) -> int:
    """The bits of these recipients (their keys) in their block."""
    value = 0
    for key in keys:
        value |= bit(key)
    return value


def _canonical(batch_id: str) -> str:
    if not isinstance(batch_id, str):
        raise ValueError(f"a batch id that is no uuid: {batch_id!r}")
    return str(uuid.UUID(batch_id))


def _firsts(positions: list[int], keys: list[int]) -> tuple[list[int], list[int]]:
    """Of sorted keys (equal ones by position), the first of each."""
    kept_positions, kept_keys = [positions[0]], [keys[0]]
    for position, key in zip(positions[1:], keys[1:], strict=True):
        if key != kept_keys[-1]:
            kept_positions.append(position)
            kept_keys.append(key)
    return kept_positions, kept_keys
