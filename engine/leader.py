"""The leader: one process across all pods runs the cluster-wide chores.

Every worker process tries to take a lease in Dragonfly (``Lease``); whoever holds it runs
the chores every ``TICK`` seconds, and renews it. If the holder dies, the lease expires
after its ttl and another process takes over.

Every tick:
- **scheduled batches** whose ``scheduled_at`` has come are started (``control.start``);
- **held batches** the engine paused until a time now past (a provider account's daily
  quota window reopened) are resumed (``control.resume``);
- **cancelled batches** still holding ``queued`` recipients are settled: every cell no
  worker is sending is claimed and its unsent recipients are recorded ``cancelled``, through
  the results stream like any other result.

Every few seconds:
- **interrupted queuing**: a batch is committed before its chunk messages are published;
  if the API died in between, the batch stays ``queued`` with no ``queued_at``; its chunks
  are published again (message ids de-duplicate; workers send only what is still queued);
- **stalled batches**: a batch with ``queued`` recipients whose progress stopped for
  ``STALL_SECONDS`` while the send stream has nothing waiting (its messages were lost, its
  workers died, Dragonfly lost its state) gets a chunk for every unfinished cell again.
  Cell leases and the done bitmap make that safe (``engine.cells``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

import redis.asyncio as aioredis

from engine import chunks, control, lifecycle, metrics, results
from engine.cells import Cells, Claim, cell_first
from engine.errors import Conflict
from engine.results import Columns
from engine.services import Services

log = logging.getLogger(__name__)

TICK = 0.5
SLOW_EVERY = 6  # ticks between the slower chores
INTERRUPTED_SECONDS = 30
# Recipients settled per results message: more than the largest chunk (a page always holds
# a whole cell), small enough for NATS's 1 MB message limit.
_SETTLE_ROWS = 5_000


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, client: aioredis.Redis, key: str, ttl: float = 10.0):
        self.key = key
        self.ttl_ms = int(ttl * 1000)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._script = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def hold(self) -> bool:
        """Take or renew the lease; True while this process is the leader."""
        return bool(await self._script(keys=[self.key], args=[self.holder, self.ttl_ms]))

    async def release(self) -> None:
        """Give the lease up if this process holds it (a draining leader: the next process
        takes over at once instead of after the lease's ttl)."""
        await self._release(keys=[self.key], args=[self.holder])


async def lead(services: Services, cells: Cells, stopping: asyncio.Event) -> None:
    """Hold the leader lease when free and run the chores while holding it, until
    ``stopping`` is set."""
    lease = Lease(services.redis, services.key("leader"))
    tick = 0
    leading = False
    metrics.LEADER.set(0)
    try:
        while not stopping.is_set():
            try:
                holds = await lease.hold()
                if holds != leading:
                    leading = holds
                    metrics.LEADER.set(int(holds))
                    if holds:
                        metrics.LEADER_CHANGES.inc()
                        log.info("took the leader lease", extra={"holder": lease.holder})
                if holds:
                    await run(services, cells, tick)
                    tick += 1
            except Exception:
                log.exception("leader chores failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), TICK)
    finally:
        metrics.LEADER.set(0)
        if leading:
            with contextlib.suppress(Exception):
                await lease.release()


async def run(services: Services, cells: Cells, tick: int) -> None:
    """One tick of the chores."""
    await start_due(services)
    await resume_due(services)
    await settle_cancelled(services, cells)
    if tick % SLOW_EVERY == 0:
        await requeue_interrupted(services)
        await recover_stalled(services)


async def start_due(services: Services) -> int:
    due = await services.pool.fetch(
        """SELECT id, tenant_id FROM batches WHERE status = 'scheduled' AND scheduled_at <= now()
            ORDER BY scheduled_at LIMIT 100"""
    )
    for row in due:
        status = await control.start(services, row["id"], from_status="scheduled")
        log.info(
            "scheduled batch started",
            extra={"batch_id": str(row["id"]), "tenant_id": row["tenant_id"], "status": status},
        )
    return len(due)


async def resume_due(services: Services) -> int:
    """Resume the batches the engine paused until a time now past (a provider account's
    daily quota window reopened)."""
    due = await services.pool.fetch(
        """SELECT id, tenant_id FROM batches
            WHERE status = 'paused' AND resume_at IS NOT NULL AND resume_at <= now()
            ORDER BY resume_at LIMIT 100"""
    )
    for row in due:
        try:
            await control.resume(services, row["tenant_id"], str(row["id"]))
        except Conflict:  # resumed or cancelled meanwhile
            continue
        log.info("held batch resumed", extra={"batch_id": str(row["id"])})
    return len(due)


async def settle_cancelled(services: Services, cells: Cells) -> int:
    """Record ``cancelled`` for the unsent recipients of cancelled batches; return how many.
    The recipients are read a page at a time (memory stays flat for any batch size), and
    each page's results go out as one results message."""
    settled = 0
    for batch in await services.pool.fetch(
        """SELECT id, tenant_id, provider, chunk_size FROM batches
            WHERE status = 'cancelled' AND final_count < total_recipients"""
    ):
        size, after = batch["chunk_size"], 1
        while after:
            rows = await services.pool.fetch(
                """SELECT seq, email FROM recipient_statuses
                    WHERE batch_id = $1 AND status = 'queued' AND seq >= $2
                    ORDER BY seq LIMIT $3""",
                batch["id"],
                after,
                _SETTLE_ROWS,
            )
            after = 0
            if len(rows) == _SETTLE_ROWS:  # the page may end inside a cell: that cell goes next
                after = cell_first(rows[-1]["seq"], size)
                whole = [r for r in rows if r["seq"] < after]
                rows, after = (whole, after) if whole else (rows, rows[-1]["seq"] + 1)
            settled += await _settle_page(services, cells, batch, rows)
    return settled


async def _settle_page(services: Services, cells: Cells, batch, rows: list) -> int:
    batch_id, size = str(batch["id"]), batch["chunk_size"]
    by_cell: dict[int, list] = {}
    for row in rows:
        by_cell.setdefault(cell_first(row["seq"], size), []).append(row)
    claimed: list[tuple[Claim, list[int]]] = []
    out = Columns()
    published = False
    try:
        for first, cell_rows in by_cell.items():
            claim = await cells.claim(batch_id, first, size)
            if claim is None:  # a worker is in this cell; it records the rest itself
                continue
            seqs: list[int] = []
            claimed.append((claim, seqs))
            for row in cell_rows:
                if not claim.done(row["seq"]):
                    seqs.append(row["seq"])
                    domain = row["email"].rpartition("@")[2].lower()
                    out.append(batch_id, row["seq"], "cancelled", attempts=0, domain=domain)
        if out:
            await results.publish(services, batch["tenant_id"], batch["provider"], out)
            log.info(
                "cancelled recipients settled",
                extra={"batch_id": batch_id, "tenant_id": batch["tenant_id"], "n": len(out)},
            )
        published = True
    finally:
        for claim, seqs in claimed:
            await cells.finish(claim, seqs if published else [])
    return len(out)


async def requeue_interrupted(services: Services) -> int:
    rows = await services.pool.fetch(
        """SELECT id, provider, tenant_id, total_recipients, chunk_size FROM batches
            WHERE status = 'queued' AND queued_at IS NULL
              AND created_at < now() - make_interval(secs => $1)""",
        INTERRUPTED_SECONDS,
    )
    for row in rows:
        queued = await chunks.queue_batch(
            services,
            row["id"],
            row["provider"],
            row["tenant_id"],
            row["total_recipients"],
            row["chunk_size"],
        )
        log.warning(
            "re-queued an interrupted batch",
            extra={"batch_id": str(row["id"]), "tenant_id": row["tenant_id"], "chunks": queued},
        )
    return len(rows)


async def _tenants(services: Services, batch_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The tenant of each batch (for the log lines of a rare chore)."""
    rows = await services.pool.fetch(
        "SELECT id, tenant_id FROM batches WHERE id = ANY($1::uuid[])", batch_ids
    )
    return {row["id"]: row["tenant_id"] for row in rows}


async def recover_stalled(services: Services) -> int:
    """Publish the unfinished cells of batches whose progress stopped; return how many
    batches. Nothing is done while the send stream still has messages waiting (a long
    backlog is not a stall)."""
    topology = services.topology
    waiting = await services.js.consumer_info(topology.send_stream, "send")
    if waiting.num_pending:
        return 0
    stalled = await lifecycle.revive_stalled(services.pool, services.settings.stall_seconds)
    tenants = await _tenants(services, [row["id"] for row in stalled]) if stalled else {}
    for row in stalled:
        queued = await chunks.queue_unfinished(services, row["id"], tag=f"g{row['generation']}")
        log.warning(
            "recovered a stalled batch",
            extra={
                "batch_id": str(row["id"]),
                "tenant_id": tenants.get(row["id"]),
                "chunks": queued,
            },
        )
    return len(stalled)
