"""Chores the leader runs: queue the chunks of batches whose queuing was interrupted.

A batch is committed before its chunk messages are published; if the API dies in between,
the batch stays ``queued`` with no ``queued_at``. Publishing its chunks again is safe: chunk
message ids de-duplicate in JetStream, and a worker only sends recipients still ``queued``.
"""

from __future__ import annotations

import logging

from engine.intake import queue_chunks
from engine.services import Services

log = logging.getLogger(__name__)

STALE_SECONDS = 30


async def requeue_interrupted(services: Services) -> int:
    rows = await services.pool.fetch(
        """SELECT id, provider, tenant_id, total_recipients, chunk_size FROM batches
            WHERE status = 'queued' AND queued_at IS NULL
              AND created_at < now() - make_interval(secs => $1)""",
        STALE_SECONDS,
    )
    for row in rows:
        chunks = await queue_chunks(services, row["id"], row["provider"], row["tenant_id"],
                                    row["total_recipients"], row["chunk_size"])  # fmt: skip
        log.warning(
            "re-queued an interrupted batch", extra={"batch_id": str(row["id"]), "chunks": chunks}
        )
    return len(rows)
