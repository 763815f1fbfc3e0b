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

A recipient whose message cannot be built (its template fails for its values: ``{{ 1/0 }}``,
``{{ x + 1 }}`` with text in ``x``, a sandbox refusal; an address that cannot be written)
is ``failed`` with the reason at once and dead-lettered; the rest of the chunk goes on. A
chunk that fails as a whole on its last allowed delivery is given up (``give_up``): its
unsent recipients become ``failed`` the same way, so the batch still completes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.msg import Msg

from engine import deadletters, metrics, results
from engine.cells import Cells
from engine.config import Rate, parse_rate
from engine.ratelimit import TokenBuckets
from engine.results import Columns
from engine.services import Services
from engine.suppressions import unsubscribe_headers
from engine.templates import BatchTemplate
from providers.base import Message, Provider, check_address, header_safe

log = logging.getLogger(__name__)

_BATCH_TTL = 1.0  # seconds a batch's status is trusted before it is read again
_MAX_SEQ = 2**31 - 1  # recipients.seq is an int4


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
        # A template that needs Jinja2 takes a while to compile: off the event loop.
        template = await asyncio.to_thread(BatchTemplate, row["subject"], row["html"], row["text"])
        if (loaded := self._items.get(batch_id)) is not None:
            return loaded  # loaded meanwhile by another chunk: one BatchInfo per batch
        if len(self._items) >= self.size:
            self._items.pop(next(iter(self._items)))
        info = BatchInfo(
            batch_id, row["tenant_id"], row["provider"], row["from_email"],
            header_safe(row["from_name"]) if row["from_name"] else row["from_name"],
            template, row["dry_run"],
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
        # The unsubscribe links are written into headers: their only part that is not
        # header-safe by construction (the token is base64url) is checked once here.
        self.public_url = header_safe(self.settings.public_url)

    async def process(self, msg: Msg) -> None:
        """Handle one chunk message end to end; acknowledges it when done."""
        try:
            batch_id, first, count, generation = _parse_chunk(msg.data)
        except ValueError as exc:
            await self._dead_letter_chunk(msg, str(exc))
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

    async def give_up(self, msg: Msg, reason: str) -> None:
        """The chunk failed as a whole on its last allowed delivery: its recipients still
        to send become ``failed`` with ``reason`` (and are dead-lettered, so a replay queues
        them again), then the message is terminated. A cell another worker holds is left to
        that worker. Raises, changing nothing, while PostgreSQL, Dragonfly or NATS do not
        answer (the chunk is then tried again)."""
        try:
            batch_id, first, count, _ = _parse_chunk(msg.data)
        except ValueError as exc:
            await self._dead_letter_chunk(msg, f"{exc}; {reason}")
            return
        batch = await self.services.pool.fetchrow(
            "SELECT tenant_id, provider FROM batches WHERE id = $1", uuid.UUID(batch_id)
        )
        claim = await self.cells.claim(batch_id, first, count) if batch else None
        if batch is None or claim is None:  # no batch; or its holder sends the cell
            log.warning("chunk given up: %s", reason, extra={"batch_id": batch_id})
            await msg.term()
            return
        published: list[int] = []
        try:
            rows = await self.services.pool.fetch(
                """SELECT seq, email FROM recipients
                    WHERE batch_id = $1 AND seq >= $2 AND seq < $3 AND status = 'queued'""",
                uuid.UUID(batch_id), first, first + count,
            )  # fmt: skip
            out = Columns()
            for r in rows:
                if not claim.done(r["seq"]):
                    out.append(batch_id, r["seq"], "failed", None, reason, 0, 0,
                               _domain(r["email"]))  # fmt: skip
            if out:
                await self._dead_letter(batch_id, batch["tenant_id"], batch["provider"],
                                        "the chunk failed on every delivery",
                                        [(seq, reason, 0) for seq in out.seq])  # fmt: skip
                await results.publish(self.services, batch["tenant_id"], batch["provider"], out)
                metrics.EMAILS.labels(batch["provider"], "failed").inc(len(out))
                published = out.seq
        finally:
            await self.cells.finish(claim, published)
        await msg.term()

    async def _send(self, info: BatchInfo, rows: list, msg: Msg) -> Columns:
        out = Columns()
        if info.dry_run or info.status == "cancelled":
            status, note = (
                ("cancelled", None) if info.status == "cancelled" else ("sent", "dry-run")
            )
            for r in rows:
                out.append(info.id, r["seq"], status, note, None, 0, 0, _domain(r["email"]))
            return out
        exhausted: list[tuple[int, str | None, int]] = []  # retryable, past the retry budget
        unbuildable: list[tuple[int, str | None, int]] = []  # no message could be built
        await self._deliver(info, rows, msg, out, exhausted, unbuildable)
        self._count(info, out)
        if unbuildable:
            await self._dead_letter(info.id, info.tenant_id, info.provider,
                                    "the message could not be built", unbuildable)  # fmt: skip
        if exhausted:
            await self._dead_letter(info.id, info.tenant_id, info.provider,
                                    "retryable provider errors past the retry budget", exhausted)  # fmt: skip
        return out

    async def _deliver(
        self,
        info: BatchInfo,
        rows: list,
        msg: Msg,
        out: Columns,
        exhausted: list[tuple[int, str | None, int]],
        unbuildable: list[tuple[int, str | None, int]],
    ) -> None:
        """Provider calls with retries, until every row has a result or the batch stops
        sending (paused: the rest stays ``queued``; cancelled: the rest is ``cancelled``)."""
        provider = self.providers[info.provider]
        configured = self.settings.provider_rate(info.provider)
        # Provider calls of at most half the burst, and the bucket one call smaller than the
        # burst: a call that leaves late (a busy machine) then still fits the provider's
        # limit of rate + burst in any second, measured at the provider (bench/rate.py).
        step = max(1, min(provider.max_batch, configured.burst // 2))
        rate = Rate(configured.per_second, max(step, configured.burst - step))
        pending = list(rows)
        attempt = 1
        while pending:
            retry, retry_after = [], 0.0
            for start in range(0, len(pending), step):
                part, messages = self._messages(info, pending[start : start + step], attempt,
                                                out, unbuildable)  # fmt: skip
                if not part:
                    continue
                if not await self._take_tokens(info, len(part), rate, msg):
                    self._stopped(info, out, part + pending[start + step :] + retry)
                    return
                sent_at = time.perf_counter()
                answers = await provider.send_batch(messages)
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
                self._stopped(info, out, retry)
                return
            attempt += 1
            pending = retry

    def _stopped(self, info: BatchInfo, out: Columns, unsent: list) -> None:
        """The batch was paused or cancelled mid-chunk: a cancel ends the unsent recipients
        here; a pause leaves them ``queued`` for the resume."""
        if info.status == "cancelled":
            for r in unsent:
                out.append(info.id, r["seq"], "cancelled", None, None, 0, 0, _domain(r["email"]))

    def _count(self, info: BatchInfo, out: Columns) -> None:
        sent, failed = out.status.count("sent"), out.status.count("failed")
        metrics.EMAILS.labels(info.provider, "sent").inc(sent)
        if failed:
            metrics.EMAILS.labels(info.provider, "failed").inc(failed)

    def _messages(
        self,
        info: BatchInfo,
        rows: list,
        attempt: int,
        out: Columns,
        unbuildable: list[tuple[int, str | None, int]],
    ) -> tuple[list, list[Message]]:
        """The rows whose message could be built, and their messages. A row whose message
        cannot be built is ``failed`` with the reason here: it would fail the same way on
        every attempt (templates come from clients, so any error rendering one is theirs)."""
        built, messages = [], []
        public_url, secret = self.public_url, self.settings.unsubscribe_secret
        for row in rows:
            try:
                messages.append(build_message(info, row, public_url, secret))
            except Exception as exc:
                error = f"message could not be built: {deadletters.reason_of(exc)}"
                out.append(info.id, row["seq"], "failed", None, error, attempt, 0,
                           _domain(row["email"]))  # fmt: skip
                unbuildable.append((row["seq"], error, attempt))
            else:
                built.append(row)
        return built, messages

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

    async def _dead_letter_chunk(self, msg: Msg, reason: str) -> None:
        """A chunk message that names no batch (malformed) to the DLQ, and terminated."""
        log.error("dead-lettering a chunk message: %s", reason)
        await deadletters.publish(self.services, "chunk", _chunk_tenant(msg.data), reason,
                                  data=deadletters.text_of(msg.data))  # fmt: skip
        await msg.term()

    async def _dead_letter(
        self, batch_id: str, tenant_id: str, provider: str, reason: str,
        failed: list[tuple[int, str | None, int]],
    ) -> None:  # fmt: skip
        """Failed recipients of one chunk to the DLQ (a replay queues them again)."""
        await deadletters.publish(
            self.services, "send", tenant_id, reason, batch_id=batch_id, provider=provider,
            failed=[{"seq": seq, "error": error, "attempts": attempts} for seq, error, attempts in failed],
        )  # fmt: skip


def build_message(
    info: BatchInfo, row: Mapping[str, Any], public_url: str, unsubscribe_secret: str
) -> Message:
    """The personalised message of one recipient (``row``: email, name, vars, seq).

    Its header fields are header-safe (``providers.base``): the rendered subject and the
    recipient's name pass ``header_safe`` here, once per recipient, and the addresses
    ``check_address``; the batch's sender name was made safe when the batch was read
    (``BatchCache``); the custom headers are safe by construction (a header-safe
    ``public_url``, a base64url token, the ref), so no time goes into checking them.
    Raises what the template raises for this recipient's values, and ``ValueError``.
    """
    rendered = info.template.render(row["email"], row["name"], row["vars"])
    ref = f"{info.id}:{row['seq']}"
    headers = unsubscribe_headers(public_url, unsubscribe_secret, info.tenant_id, row["email"])
    headers["X-BatchSender-Ref"] = ref
    name = row["name"]
    return Message(
        ref, check_address(row["email"]), header_safe(name) if name else name,
        check_address(info.from_email), info.from_name, header_safe(rendered.subject), rendered.html,
        rendered.text, headers,
    )  # fmt: skip


def _parse_chunk(data: bytes) -> tuple[str, int, int, int]:
    """(batch id, first seq, count, generation) of a chunk message; ``ValueError`` when it
    is not one."""
    try:
        chunk = orjson.loads(data)
        batch_id = str(uuid.UUID(chunk["b"]))
        first, count, generation = int(chunk["f"]), int(chunk["n"]), int(chunk.get("g", 0))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not a chunk message: {exc!r}") from None
    if not (1 <= first <= _MAX_SEQ and 1 <= count <= _MAX_SEQ - first + 1):
        raise ValueError(f"not a chunk message: seqs {first} to {first + count - 1}")
    return batch_id, first, count, generation


def _chunk_tenant(data: bytes) -> str | None:
    """The tenant a (malformed) chunk message names, if any, for its dead letter."""
    try:
        tenant = orjson.loads(data).get("t")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return tenant if isinstance(tenant, str) else None


def _domain(email: str) -> str:
    return email.rpartition("@")[2].lower()
