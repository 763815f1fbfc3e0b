"""Who may send a chunk, and which of its recipients already have a result: Dragonfly state.

A batch's recipients are cut into *cells* of ``chunk_size`` (cell ``k`` covers seqs
``k*chunk_size+1 .. (k+1)*chunk_size``), and every chunk message covers exactly one cell,
whether it was published at intake, by a resume, a cancel, a DLQ replay or the leader's
recovery. Two things make it safe to have several messages for one cell at once:

- a **lease** per cell (``cell:{batch}:{first}``, SET NX with an owner token): only its
  holder calls the provider for that cell; the holder renews it while working (the worker's
  heartbeat) and gives it back when done; a dead holder's lease expires after
  ``LEASE_SECONDS``;
- a **done bitmap** per batch (``done:{batch}``, one bit per seq), set once a recipient's
  result is durable in NATS (by the holder's next call to Dragonfly: its next token
  reservation, a ``mark`` before a backoff, or ``finish``). PostgreSQL learns of results a
  little later (the results-pg writer's flush); the bitmap covers that gap, so a cell
  picked up again right after a pause or a crash skips recipients whose result is on its
  way.

The remaining window for a duplicate: recipients whose provider call had started but whose
results were not yet published when their worker died (at most ``WORKER_CONCURRENCY``
chunks per killed process). Losing Dragonfly's state (the ``state`` key is gone) would lose
the bitmaps too: senders then wait until the results-pg writer has applied every published
result, so PostgreSQL alone is the truth again, before they send anything (``rebuild``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable

from engine.ratelimit import SET_BITS_LUA, Bits
from engine.services import Services

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
DONE_TTL_SECONDS = 7 * 24 * 3600

_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0, ''} end
return {1, redis.call('GETRANGE', KEYS[3], ARGV[3], ARGV[4])}
"""

# ARGV[3..]: (first, last) pairs of seq ranges whose bits to set.
_FINISH = (
    SET_BITS_LUA
    + """
for i = 3, #ARGV, 2 do set_bits(KEYS[1], tonumber(ARGV[i]), tonumber(ARGV[i + 1])) end
if #ARGV >= 3 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""
)

_RENEW = """
local held = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    held = held + 1
  end
end
return held
"""

_CLEAR = """
for i = 1, #ARGV do redis.call('SETBIT', KEYS[1], ARGV[i], 0) end
return 1
"""


def cell_first(seq: int, chunk_size: int) -> int:
    """The first seq of the cell that holds ``seq``."""
    return (seq - 1) // chunk_size * chunk_size + 1


def cells_of(seqs: Iterable[int], chunk_size: int) -> list[int]:
    """The first seq of every cell that holds one of ``seqs``, in order."""
    return sorted({cell_first(seq, chunk_size) for seq in seqs})


def _ranges(seqs: list[int]) -> list[int]:
    """``seqs`` as flat (first, last) pairs of runs of consecutive seqs (any order works;
    in order, a chunk's usual 100 results are two arguments to send, not 100)."""
    pairs: list[int] = []
    for seq in seqs:
        if pairs and seq == pairs[-1] + 1:
            pairs[-1] = seq
        else:
            pairs += (seq, seq)
    return pairs


class Claim:
    """A held cell: its lease and which of its recipients already have a result."""

    __slots__ = ("batch_id", "first", "token", "_done", "_first_byte", "unmarked")

    def __init__(self, batch_id: str, first: int, token: str, done: bytes, first_byte: int):
        self.batch_id, self.first, self.token = batch_id, first, token
        self._done, self._first_byte = done, first_byte
        self.unmarked: list[int] = []  # published results whose bits are still to set

    @property
    def any_done(self) -> bool:
        """Whether any of the cell's recipients had a result when it was claimed (most
        cells are claimed once: then no recipient needs a look)."""
        return bool(self._done.strip(b"\x00"))

    def done(self, seq: int) -> bool:
        index = seq // 8 - self._first_byte
        if not 0 <= index < len(self._done):
            return False
        return bool(self._done[index] >> (7 - seq % 8) & 1)


class Cells:
    def __init__(self, services: Services):
        self.services = services
        redis = services.redis
        self._claim = redis.register_script(_CLAIM)
        self._finish = redis.register_script(_FINISH)
        self._renew = redis.register_script(_RENEW)
        self._clear = redis.register_script(_CLEAR)
        self.held: dict[str, str] = {}  # lease key -> token, for the heartbeat's renewals

    def _lease_key(self, batch_id: str, first: int) -> str:
        return self.services.key("cell", batch_id, str(first))

    def _done_key(self, batch_id: str) -> str:
        return self.services.key("done", batch_id)

    @property
    def _state_key(self) -> str:
        return self.services.key("state")

    async def claim(self, batch_id: str, first: int, count: int) -> Claim | None:
        """Take the cell's lease; None while another holder has it. Waits for ``rebuild``
        when Dragonfly has lost its state."""
        token = uuid.uuid4().hex
        lease = self._lease_key(batch_id, first)
        first_byte, last_byte = first // 8, (first + count - 1) // 8
        while True:
            granted, done = await self._claim(
                keys=[self._state_key, lease, self._done_key(batch_id)],
                args=[token, int(LEASE_SECONDS * 1000), first_byte, last_byte],
            )
            if granted == -1:
                await self.rebuild()
                continue
            if granted == 0:
                return None
            self.held[lease] = token
            return Claim(batch_id, first, token, done or b"", first_byte)

    async def finish(self, claim: Claim, done_seqs: list[int]) -> None:
        """Mark recipients whose results are now in NATS (and those ``published`` and not
        marked yet), and give the lease back."""
        lease = self._lease_key(claim.batch_id, claim.first)
        if self.held.get(lease) == claim.token:
            del self.held[lease]
        seqs, claim.unmarked = claim.unmarked + done_seqs, []
        await self._finish(
            keys=[self._done_key(claim.batch_id), lease],
            args=[claim.token, DONE_TTL_SECONDS, *_ranges(seqs)],
        )

    def published(self, claim: Claim, done_seqs: list[int]) -> None:
        """Recipients whose results are now in NATS, their bits set by the holder's next
        call to Dragonfly: its next token reservation (``take_bits``), ``mark`` before it
        waits, or ``finish``. Only the holder sends the cell, so until it gives the lease
        back nobody else needs the bits; a holder killed in between leaves the results of
        its last call unmarked (as it would have a moment later without this)."""
        claim.unmarked += done_seqs

    def take_bits(self, claim: Claim) -> Bits | None:
        """The bits ``published`` and not set yet, to set with a token reservation."""
        if not claim.unmarked:
            return None
        seqs, claim.unmarked = claim.unmarked, []
        return Bits(self._done_key(claim.batch_id), DONE_TTL_SECONDS, _ranges(seqs))

    async def mark(self, claim: Claim) -> None:
        """Set the bits ``published`` and not set yet now, keeping the lease (the holder is
        about to wait: a retry's backoff)."""
        if not claim.unmarked:
            return
        seqs, claim.unmarked = claim.unmarked, []
        await self._finish(
            keys=[self._done_key(claim.batch_id), self._lease_key(claim.batch_id, claim.first)],
            args=["", DONE_TTL_SECONDS, *_ranges(seqs)],  # no token: the lease stays
        )

    async def renew(self) -> int:
        """Extend every lease this process holds (the worker's heartbeat calls this)."""
        if not self.held:
            return 0
        keys, tokens = list(self.held), list(self.held.values())
        return int(await self._renew(keys=keys, args=[int(LEASE_SECONDS * 1000), *tokens]))

    async def clear_done(self, batch_id: str, seqs: list[int]) -> None:
        """Forget results of recipients that are queued again (a dead-letter replay)."""
        for start in range(0, len(seqs), 10_000):
            await self._clear(keys=[self._done_key(batch_id)], args=seqs[start : start + 10_000])

    async def rebuild(self) -> None:
        """Dragonfly lost its state: wait until PostgreSQL holds every published result,
        then mark the state present again (from then on PostgreSQL alone is the truth)."""
        services = self.services
        topology = services.topology
        while not await services.redis.exists(self._state_key):
            info = await services.js.consumer_info(topology.results_stream, "results-pg")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                if await services.redis.set(self._state_key, "1", nx=True):
                    log.warning("Dragonfly state rebuilt from PostgreSQL")
                return
            await asyncio.sleep(0.5)
