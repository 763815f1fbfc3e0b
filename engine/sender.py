"""Sending one chunk: read its recipients, take tokens, call the provider, record results.

A chunk message names a recipient range of one batch. Only recipients still ``queued``
are read (one query per chunk), so a chunk redelivered after its results were written
sends nothing again. Results are published to NATS before the chunk is acknowledged.

Duplicate bound after a crash: recipients handed to the provider whose results were not
yet applied to PostgreSQL can be sent again when their chunk is redelivered; that is at
most ``WORKER_CONCURRENCY`` chunks per killed process plus what the ``results-pg`` writer
had not yet applied. Such chunks come back after ``SEND_ACK_WAIT`` (15 s).
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
from engine.config import Rate
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
    loaded_at: float


class BatchCache:
    """Batches by id, templates compiled once; the status is re-read after ``_BATCH_TTL``."""

    def __init__(self, services: Services, size: int = 512):
        self.services = services
        self.size = size
        self._items: dict[str, BatchInfo] = {}

    async def get(self, batch_id: str) -> BatchInfo | None:
        info = self._items.get(batch_id)
        now = time.monotonic()
        if info is not None and now - info.loaded_at < _BATCH_TTL:
            return info
        if info is not None:
            info.status = await self.services.pool.fetchval(
                "SELECT status FROM batches WHERE id = $1", uuid.UUID(batch_id)
            )
            info.loaded_at = now
            return info
        row = await self.services.pool.fetchrow(
            """SELECT tenant_id, provider, from_email, from_name, subject, html, text, dry_run,
                      status FROM batches WHERE id = $1""",
            uuid.UUID(batch_id),
        )
        if row is None:
            return None
        if len(self._items) >= self.size:
            self._items.pop(next(iter(self._items)))
        info = BatchInfo(
            batch_id, row["tenant_id"], row["provider"], row["from_email"], row["from_name"],
            BatchTemplate(row["subject"], row["html"], row["text"]), row["dry_run"],
            row["status"], now,
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

    async def process(self, msg: Msg) -> None:
        """Handle one chunk message end to end; acknowledges it when done."""
        try:
            chunk = orjson.loads(msg.data)
            batch_id, first, count = chunk["b"], int(chunk["f"]), int(chunk["n"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.error("dropping malformed chunk message")
            await msg.term()
            return
        info = await self.batches.get(batch_id)
        if info is None or info.status in ("cancelled", "failed", "completed"):
            await msg.ack()
            return
        if info.status == "paused":
            await msg.nak(delay=1.0)
            return
        rows = await self.services.pool.fetch(
            """SELECT seq, email, name, vars FROM recipients
                WHERE batch_id = $1 AND seq >= $2 AND seq < $3 AND status = 'queued'
                ORDER BY seq""",
            uuid.UUID(batch_id), first, first + count,
        )  # fmt: skip
        if rows:
            out = await self._send(info, rows, msg)
            await results.publish(self.services, info.tenant_id, info.provider, out)
        await msg.ack()

    async def _send(self, info: BatchInfo, rows: list, msg: Msg) -> Columns:
        out = Columns()
        if info.dry_run:
            for r in rows:
                out.append(info.id, r["seq"], "sent", "dry-run", None, 0, 0, _domain(r["email"]))
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
                await self._take_tokens(info, len(part), rate, msg)
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
            if retry:
                await self._backoff(attempt, retry_after, msg)
                attempt += 1
            pending = retry
        sent = out.status.count("sent")
        metrics.EMAILS.labels(info.provider, "sent").inc(sent)
        if len(out) > sent:
            metrics.EMAILS.labels(info.provider, "failed").inc(len(out) - sent)
        if exhausted:
            await self._dead_letter(info, exhausted)
        return out

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

    async def _take_tokens(self, info: BatchInfo, n: int, rate: Rate, msg: Msg) -> None:
        """Reserve ``n`` tokens in all three buckets; keep the chunk alive while waiting."""
        key = self.services.key
        buckets = [
            (key("rl", "system"), self.settings.system_rate),
            (key("rl", "provider", info.provider), rate),
            (key("rl", "tenant", info.tenant_id), self.settings.tenant_rate),
        ]
        waited = 0.0
        while True:
            reservation = await self.buckets.reserve(n, buckets)
            if reservation.granted:
                if reservation.wait > 0:
                    await asyncio.sleep(reservation.wait)
                waited += reservation.wait
                break
            await msg.in_progress()
            pause = min(1.0, max(0.01, reservation.wait - self.buckets.max_wait))
            await asyncio.sleep(pause)
            waited += pause
        metrics.RATE_LIMIT_WAIT.labels(info.provider).observe(waited)

    async def _backoff(self, attempt: int, retry_after: float, msg: Msg) -> None:
        """Exponential backoff with full jitter, at least the provider's Retry-After."""
        base = self.settings.retry_base_seconds * (2 ** (attempt - 1))
        delay = max(retry_after, random.uniform(base / 2, base))
        while delay > 0:
            await msg.in_progress()
            step = min(delay, 10.0)
            await asyncio.sleep(step)
            delay -= step

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
