"""Chunk messages: the SEND stream's unit of work, and publishing them.

A chunk names one cell of a batch (``engine.cells``): ``chunk_size`` recipients from
``first`` on, sent by whichever worker holds the cell's lease. On the wire it is a small
JSON object, ``{"b": batch id, "t": tenant, "p": provider, "f": first seq, "n": count,
"g": generation}`` (``g`` only when not 0), published to ``{prefix}.send.{provider}`` under
the message id ``batch:first[:tag]``, so JetStream drops a chunk published twice; a
resume, cancel, replay or recovery publishes under its own tag.

A cell holds ``cell_size`` recipients: as many whole provider calls as fit in
``CELL_RECIPIENTS`` (at least one). Every chunk message costs the same whatever its size
(publish, fetch, ack, the cell's claim, one query for its recipients, the batch's status),
so large cells spread that over many recipients; the sender still calls the provider in
its batch size and publishes each call's results at once (``engine.sender.Outbox``), so a
worker killed mid-chunk can send again only the call it was making.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from engine import lifecycle
from engine.blocks import MAX_SEQ
from engine.cells import cells_of
from engine.services import Services

_PUBLISH_WINDOW = 512  # chunks published before waiting for their acks
ANALYZE_AT = 10_000  # recipients of a batch that refresh the table's statistics (queue_batch)
CELL_RECIPIENTS = 1000  # recipients per cell, rounded down to whole provider calls


def cell_size(max_per_call: int) -> int:
    """The recipients of one cell (one chunk message) for a provider taking
    ``max_per_call`` per call."""
    return max_per_call * max(1, CELL_RECIPIENTS // max_per_call)


@dataclass(frozen=True, slots=True)
class Chunk:
    batch_id: str
    tenant_id: str | None
    provider: str | None
    first: int
    count: int
    generation: int = 0

    def encode(self) -> bytes:
        body = {
            "b": self.batch_id,
            "t": self.tenant_id,
            "p": self.provider,
            "f": self.first,
            "n": self.count,
        }
        if self.generation:
            body["g"] = self.generation
        return orjson.dumps(body)

    @classmethod
    def decode(cls, data: bytes) -> Chunk:
        """The chunk a message holds; ``ValueError`` when it is not one."""
        try:
            body = orjson.loads(data)
            chunk = cls(
                batch_id=str(uuid.UUID(body["b"])),
                tenant_id=body.get("t"),
                provider=body.get("p"),
                first=int(body["f"]),
                count=int(body["n"]),
                generation=int(body.get("g", 0)),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a chunk message: {exc!r}") from None
        if not (1 <= chunk.first <= MAX_SEQ and 1 <= chunk.count <= MAX_SEQ - chunk.first + 1):
            raise ValueError(
                f"not a chunk message: seqs {chunk.first} to {chunk.first + chunk.count - 1}"
            )
        return chunk


def tenant_of(data: bytes) -> str | None:
    """The tenant a message that is no chunk names, if any (for its dead letter)."""
    try:
        tenant = orjson.loads(data).get("t")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return tenant if isinstance(tenant, str) else None


async def _publish(
    services: Services,
    batch_id: uuid.UUID,
    provider: str,
    tenant_id: str,
    ranges: Iterable[tuple[int, int]],
    tag: str = "",
    generation: int = 0,
) -> int:
    """One chunk message per (first seq, count), published with a window of acks."""
    subject = services.topology.send_subject(provider)
    pending: list[asyncio.Future] = []
    count = 0
    for first, n in ranges:
        data = Chunk(str(batch_id), tenant_id, provider, first, n, generation).encode()
        msg_id = f"{batch_id}:{first}" + (f":{tag}" if tag else "")
        pending.append(
            await services.js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id})
        )
        count += 1
        if len(pending) >= _PUBLISH_WINDOW:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return count


async def queue_batch(
    services: Services,
    batch_id: uuid.UUID,
    provider: str,
    tenant_id: str,
    total: int,
    chunk_size: int,
) -> int:
    """Publish one chunk per cell of a batch just queued; then mark it queued (until then
    the leader sees it interrupted and publishes them again). A large batch refreshes the
    recipients' statistics first (``ANALYZE_AT``)."""
    if total >= ANALYZE_AT:
        # The results' UPDATE joins a flush to its recipients by key where they are still
        # ``queued``. Planned with statistics that know no (or few) queued rows (a table
        # not analyzed yet, or one of finished batches), PostgreSQL scans the recipients and
        # re-reads the whole flush for each of them: seen in CI, 15 s per flush of 300 and a
        # 40,000 batch stalled for minutes. With fresh statistics it probes the flush's keys.
        # Only the status column: a fifth of a full ANALYZE's time (35-70 ms for 200,000).
        await services.pool.execute("ANALYZE recipients (status)")
    ranges = (
        (first, min(chunk_size, total - first + 1)) for first in range(1, total + 1, chunk_size)
    )
    count = await _publish(services, batch_id, provider, tenant_id, ranges)
    await lifecycle.chunks_queued(services.pool, batch_id)
    return count


async def queue_cells(
    services: Services,
    batch_id: uuid.UUID,
    provider: str,
    tenant_id: str,
    seqs: Iterable[int],
    chunk_size: int,
    tag: str,
    generation: int = 0,
) -> int:
    """Chunks for the cells holding the given recipients again (a chunk sends only those
    still queued and not done: see ``engine.cells``)."""
    ranges = [(first, chunk_size) for first in cells_of(seqs, chunk_size)]
    return await _publish(services, batch_id, provider, tenant_id, ranges, tag, generation)


async def queue_unfinished(services: Services, batch_id: uuid.UUID, tag: str) -> int:
    """Chunks for every cell of the batch that still has ``queued`` recipients, carrying
    the batch's current generation (resume and recovery)."""
    batch = await services.pool.fetchrow(
        "SELECT provider, tenant_id, chunk_size, generation FROM batches WHERE id = $1", batch_id
    )
    firsts = await services.pool.fetch(
        """SELECT DISTINCT (seq - 1) / $2 * $2 + 1 AS first FROM recipient_statuses
            WHERE batch_id = $1 AND status = 'queued'""",
        batch_id,
        batch["chunk_size"],
    )
    return await queue_cells(
        services,
        batch_id,
        batch["provider"],
        batch["tenant_id"],
        [r["first"] for r in firsts],
        batch["chunk_size"],
        tag,
        batch["generation"],
    )
