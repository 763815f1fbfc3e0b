"""Sending one chunk: claim its cell, read its recipients, take tokens, call the provider,
record results.

A chunk message names one cell of a batch (``engine.cells``). The worker that holds the
cell's lease reads the recipients still ``queued`` whose result is not already on its way
(the done bitmap), so a chunk redelivered or published again sends nothing twice. Results
are published to NATS, then marked done, then the message is acknowledged.

Batch control: the batch's status is re-read at most a second old before every provider
call. ``paused``: the chunk stops there (results so far are published; the rest stays
``queued`` for ``resume``, which publishes the cells again). ``cancelled``: the rest of the
chunk is recorded ``cancelled``. A chunk of a paused batch that arrives is dropped (resume
publishes it again); chunk messages carry the batch's generation, so a message published
by a resume makes a worker re-read a status it cached before that resume.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass

import orjson
from nats.aio.msg import Msg

from engine import metrics, results
from engine.cells import Cells
from engine.config import Rate, parse_rate
from engine.ratelimit import TokenBuckets
from engine.results import Columns
from engine.services import Services
from engine.suppressions import unsubscribe_headers
from engine.templates import BatchTemplate
from providers.base import Message, Provider

log = logging.getLogger(__name__)

_BATCH_TTL = 1.0  # seconds a batch's status is trusted before it is read again


@dataclass(slots=True)
class BatchInfo:
    id: str
    tenant_id: str
    provider: str
    from_email: str
    from_name: str | None
    template: BatchTemplate
    dry_run: bool
    status: str
    generation: int
    tenant_rate: Rate | None
    loaded_at: float

    @property
    def sending(self) -> bool:
        return self.status in ("queued", "processing")


class BatchCache:
    """Batches by id, templates compiled once; the status is re-read after ``_BATCH_TTL``."""

    def __init__(self, services: Services, size: int = 512):
        self.services = services
        self.size = size
        self._items: dict[str, BatchInfo] = {}

    async def get(self, batch_id: str, generation: int = 0) -> BatchInfo | None:
        """The batch; its status at most ``_BATCH_TTL`` old, and no older than a message of
        a later ``generation`` (published by a resume)."""
        info = self._items.get(batch_id)
        now = time.monotonic()
        if info is not None and now - info.loaded_at < _BATCH_TTL and generation <= info.generation:
            return info
        if info is not None:
            row = await self.services.pool.fetchrow(
                "SELECT status, generation FROM batches WHERE id = $1", uuid.UUID(batch_id)
            )
            info.status, info.generation, info.loaded_at = row["status"], row["generation"], now
            return info
        row = await self.services.pool.fetchrow(
            """SELECT b.tenant_id, b.provider, b.from_email, b.from_name, b.subject, b.html,
                      b.text, b.dry_run, b.status, b.generation, t.send_rate
                 FROM batches b JOIN tenants t ON t.id = b.tenant_id WHERE b.id = $1""",
            uuid.UUID(batch_id),
        )
        if row is None:
            return None
        if len(self._items) >= self.size:
            self._items.pop(next(iter(self._items)))
        info = BatchInfo(
            batch_id, row["tenant_id"], row["provider"], row["from_email"], row["from_name"],
            BatchTemplate(row["subject"], row["html"], row["text"]), row["dry_run"],
            row["status"], row["generation"],
            parse_rate(row["send_rate"]) if row["send_rate"] else None, now,
        )  # fmt: skip
        self._items[batch_id] = info
        return info


class Sender:
    def __init__(self, services: Services, providers: dict[str, Provider]):
        self.services = services
        self.settings = services.settings
        self.providers = providers
        self.batches = BatchCache(services)
        self.buckets = TokenBuckets(services.redis)
        self.cells = Cells(services)

    async def process(self, msg: Msg) -> None:
        """Handle one chunk message end to end; acknowledges it when done."""
        try:
            chunk = orjson.loads(msg.data)
            batch_id, first, count = chunk["b"], int(chunk["f"]), int(chunk["n"])
            generation = int(chunk.get("g", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("dropping malformed chunk message")
            await msg.term()
            return
        info = await self.batches.get(batch_id, generation)
        if info is None or not (info.sending or info.status == "cancelled"):
            await msg.ack()  # done, failed, or paused (resume publishes its cells again)
            return
        claim = await self.cells.claim(batch_id, first, count)
        if claim is None:  # another worker holds this cell; by the next look it is done
            await msg.nak(delay=2.0)
            return
        published: list[int] = []  # only results durable in NATS are marked done
        try:
            rows = await self.services.pool.fetch(
                """SELECT seq, email, name, vars FROM recipients
                    WHERE batch_id = $1 AND seq >= $2 AND seq < $3 AND status = 'queued'
                    ORDER BY seq""",
                uuid.UUID(batch_id), first, first + count,
            )  # fmt: skip
            rows = [r for r in rows if not claim.done(r["seq"])]
            if rows:
                out = await self._send(info, rows, msg)
                if out:
                    await results.publish(self.services, info.tenant_id, info.provider, out)
                    published = out.seq
        finally:
            await self.cells.finish(claim, published)
        await msg.ack()

    async def _send(self, info: BatchInfo, rows: list, msg: Msg) -> Columns:
        out = Columns()
        if info.dry_run or info.status == "cancelled":
            status, note = (
                ("cancelled", None) if info.status == "cancelled" else ("sent", "dry-run")
            )
            for r in rows:
                out.append(info.id, r["seq"], status, note, None, 0, 0, _domain(r["email"]))
            return out
        provider = self.providers[info.provider]
        configured = self.settings.provider_rate(info.provider)
        # Provider calls of at most half the burst, and the bucket one call smaller than the
        # burst: a call that leaves late (a busy machine) then still fits the provider's
        # limit of rate + burst in any second, measured at the provider (bench/rate.py).
        step = max(1, min(provider.max_batch, configured.burst // 2))
        rate = Rate(configured.per_second, max(step, configured.burst - step))
        exhausted: list[tuple[int, str | None, int]] = []  # retryable, past the retry budget
        pending = list(rows)
        attempt = 1
        while pending:
            retry, retry_after = [], 0.0
            for start in range(0, len(pending), step):
                part = pending[start : start + step]
                if not await self._take_tokens(info, len(part), rate, msg):
                    return self._stopped(info, out, pending[start:] + retry)
                sent_at = time.perf_counter()
                answers = await provider.send_batch([self._message(info, r) for r in part])
                elapsed = time.perf_counter() - sent_at
                metrics.SEND_SECONDS.labels(info.provider).observe(elapsed)
                latency_ms = int(elapsed * 1000)
                for row, answer in zip(part, answers, strict=True):
                    if answer.ok:
                        out.append(info.id, row["seq"], "sent", answer.provider_message_id,
                                   None, attempt, latency_ms, _domain(row["email"]))  # fmt: skip
                    elif answer.retryable and attempt < self.settings.send_max_attempts:
                        retry.append(row)
                        retry_after = max(retry_after, answer.retry_after or 0.0)
                    else:
                        out.append(info.id, row["seq"], "failed", None, answer.error,
                                   attempt, latency_ms, _domain(row["email"]))  # fmt: skip
                        if answer.retryable:
                            exhausted.append((row["seq"], answer.error, attempt))
            if retry and not await self._backoff(info, attempt, retry_after, msg):
                return self._stopped(info, out, retry)
            attempt += 1
            pending = retry
        self._count(info, out)
        if exhausted:
            await self._dead_letter(info, exhausted)
        return out

    def _stopped(self, info: BatchInfo, out: Columns, unsent: list) -> Columns:
        """The batch was paused or cancelled mid-chunk: a cancel ends the unsent recipients
        here; a pause leaves them ``queued`` for the resume."""
        self._count(info, out)
        if info.status == "cancelled":
            for r in unsent:
                out.append(info.id, r["seq"], "cancelled", None, None, 0, 0, _domain(r["email"]))
        return out

    def _count(self, info: BatchInfo, out: Columns) -> None:
        sent, failed = out.status.count("sent"), out.status.count("failed")
        metrics.EMAILS.labels(info.provider, "sent").inc(sent)
        if failed:
            metrics.EMAILS.labels(info.provider, "failed").inc(failed)

    def _message(self, info: BatchInfo, row) -> Message:
        rendered = info.template.render(row["email"], row["name"], row["vars"])
        ref = f"{info.id}:{row['seq']}"
        headers = unsubscribe_headers(
            self.settings.public_url, self.settings.unsubscribe_secret, info.tenant_id, row["email"]
        )
        headers["X-BatchSender-Ref"] = ref
        return Message(
            ref, row["email"], row["name"], info.from_email, info.from_name,
            rendered.subject, rendered.html, rendered.text, headers,
        )  # fmt: skip

    async def _still_sending(self, info: BatchInfo) -> bool:
        await self.batches.get(info.id)  # refreshes ``info`` in place when it is a second old
        return info.sending

    async def _take_tokens(self, info: BatchInfo, n: int, rate: Rate, msg: Msg) -> bool:
        """Reserve ``n`` tokens in all three buckets, keeping the chunk alive while waiting;
        False (nothing taken) once the batch is no longer sending."""
        key = self.services.key
        buckets = [
            (key("rl", "system"), self.settings.system_rate),
            (key("rl", "provider", info.provider), rate),
            (key("rl", "tenant", info.tenant_id), info.tenant_rate or self.settings.tenant_rate),
        ]
        waited = 0.0
        while await self._still_sending(info):
            reservation = await self.buckets.reserve(n, buckets)
            if reservation.granted:
                if reservation.wait > 0:
                    await asyncio.sleep(reservation.wait)
                waited += reservation.wait
                metrics.RATE_LIMIT_WAIT.labels(info.provider).observe(waited)
                return True
            await msg.in_progress()
            pause = min(1.0, max(0.01, reservation.wait - self.buckets.max_wait))
            await asyncio.sleep(pause)
            waited += pause
        return False

    async def _backoff(self, info: BatchInfo, attempt: int, retry_after: float, msg: Msg) -> bool:
        """Exponential backoff with full jitter, at least the provider's Retry-After; False
        when the batch stopped sending meanwhile."""
        base = self.settings.retry_base_seconds * (2 ** (attempt - 1))
        delay = max(retry_after, random.uniform(base / 2, base))
        while delay > 0:
            await msg.in_progress()
            step = min(delay, 1.0)
            await asyncio.sleep(step)
            delay -= step
            if not await self._still_sending(info):
                return False
        return True

    async def _dead_letter(
        self, info: BatchInfo, failed: list[tuple[int, str | None, int]]
    ) -> None:
        body = orjson.dumps({
            "kind": "send",
            "reason": "retryable provider errors past the retry budget",
            "batch_id": info.id,
            "tenant_id": info.tenant_id,
            "provider": info.provider,
            "failed": [{"seq": seq, "error": error, "attempts": attempts} for seq, error, attempts in failed],
        })  # fmt: skip
        await self.services.js.publish(self.services.topology.dlq_subject("send"), body)


def _domain(email: str) -> str:
    return email.rpartition("@")[2].lower()
