"""Sending one chunk: claim its cell, read its recipients, take tokens, call the provider,
record results.

A chunk message names one cell of a batch (``engine.cells``). The worker that holds the
cell's lease reads the recipients still ``queued`` whose result is not already on its way
(the done bitmap), so a chunk redelivered or published again sends nothing twice. Results
are published to NATS, then marked done (with the next token reservation, in the same
Dragonfly call), then the message is acknowledged.

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
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.msg import Msg

from engine import deadletters, lifecycle, metrics, results, suppressions, tracing
from engine.cells import Cells, Claim
from engine.chunks import Chunk
from engine.config import Rate, parse_rate
from engine.lifecycle import SENDING
from engine.ratelimit import DailyQuota, TokenBuckets, quota_window
from engine.results import Columns
from engine.routes import Route, Routes
from engine.services import Services
from engine.suppressions import UnsubscribeLinks
from engine.templates import BatchTemplate
from providers.base import Message, Provider, SendResult, check_address, header_safe

log = logging.getLogger(__name__)

# The token buckets every provider call reserves from, by the metrics' name for each.
BUCKETS = ("system", "provider", "tenant")
_BATCH_TTL = 1.0  # seconds a batch's status is trusted before it is read again
# A provider that says its sending quota is used up (SES, Resend) is asked again after this.
PROVIDER_HOLD_SECONDS = 3600.0


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
    account_id: str | None = None  # its provider account (None: the default account)

    @property
    def sending(self) -> bool:
        return self.status in SENDING


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
                      b.text, b.dry_run, b.status, b.generation, b.provider_account_id,
                      t.send_rate
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
            batch_id,
            row["tenant_id"],
            row["provider"],
            row["from_email"],
            header_safe(row["from_name"]) if row["from_name"] else row["from_name"],
            template,
            row["dry_run"],
            row["status"],
            row["generation"],
            parse_rate(row["send_rate"]) if row["send_rate"] else None,
            now,
            str(row["provider_account_id"]) if row["provider_account_id"] else None,
        )
        self._items[batch_id] = info
        return info


class Sender:
    def __init__(self, services: Services, providers: dict[str, Provider]):
        self.services = services
        self.settings = services.settings
        self.routes = Routes(services, providers)
        self.batches = BatchCache(services)
        self.buckets = TokenBuckets(services.redis)
        self.quota = DailyQuota(services.redis)
        self.cells = Cells(services)
        # The unsubscribe links are written into headers: their only part that is not
        # header-safe by construction (the token is base64url) is checked once here.
        self.public_url = header_safe(self.settings.public_url)

    async def process(self, msg: Msg) -> None:
        """Handle one chunk message end to end; acknowledges it when done."""
        try:
            chunk = Chunk.decode(msg.data)
        except ValueError as exc:
            await self._dead_letter_chunk(msg, str(exc))
            return
        batch_id, first, count = chunk.batch_id, chunk.first, chunk.count
        tracing.bind(batch_id=batch_id, tenant_id=chunk.tenant_id)  # this chunk's task
        info = await self.batches.get(batch_id, chunk.generation)
        if info is None or not (info.sending or info.status == "cancelled"):
            await msg.ack()  # done, failed, or paused (resume publishes its cells again)
            return
        claim = await self.cells.claim(batch_id, first, count)
        if claim is None:  # another worker holds this cell; by the next look it is done
            await msg.nak(delay=2.0)
            return
        try:
            rows = await self.services.pool.fetch(
                lifecycle.TO_SEND,
                uuid.UUID(batch_id),
                first,
                first + count,
            )
            if claim.any_done:
                rows = [r for r in rows if not claim.done(r["seq"])]
            if rows:
                await self._send(info, rows, msg, Outbox(self, info, claim))
        finally:
            await self.cells.finish(claim, [])  # the results' bits are set as they go
        await msg.ack()

    async def give_up(self, msg: Msg, reason: str) -> None:
        """The chunk failed as a whole on its last allowed delivery: its recipients still
        to send become ``failed`` with ``reason`` (and are dead-lettered, so a replay queues
        them again), then the message is terminated. A cell another worker holds is left to
        that worker. Raises, changing nothing, while PostgreSQL, Dragonfly or NATS do not
        answer (the chunk is then tried again)."""
        try:
            chunk = Chunk.decode(msg.data)
        except ValueError as exc:
            await self._dead_letter_chunk(msg, f"{exc}; {reason}")
            return
        batch_id, first, count = chunk.batch_id, chunk.first, chunk.count
        tracing.bind(batch_id=batch_id, tenant_id=chunk.tenant_id)  # this chunk's task
        batch = await self.services.pool.fetchrow(
            "SELECT tenant_id, provider FROM batches WHERE id = $1", uuid.UUID(batch_id)
        )
        claim = await self.cells.claim(batch_id, first, count) if batch else None
        if batch is None or claim is None:  # no batch; or its holder sends the cell
            log.warning("chunk given up: %s", reason)
            await msg.term()
            return
        published: list[int] = []
        try:
            rows = await self.services.pool.fetch(
                lifecycle.TO_SEND,
                uuid.UUID(batch_id),
                first,
                first + count,
            )
            out = Columns()
            for r in rows:
                if not claim.done(r["seq"]):
                    out.append(
                        batch_id,
                        r["seq"],
                        "failed",
                        error=reason,
                        attempts=0,
                        domain=_domain(r["email"]),
                    )
            if out:
                await deadletters.send(
                    self.services,
                    batch_id,
                    batch["tenant_id"],
                    batch["provider"],
                    "the chunk failed on every delivery",
                    [(seq, reason, 0) for seq in out.seq],
                )
                await results.publish(self.services, batch["tenant_id"], batch["provider"], out)
                metrics.EMAILS.labels(batch["provider"], "failed").inc(len(out))
                published = out.seq
        finally:
            await self.cells.finish(claim, published)
        await msg.term()

    async def _send(self, info: BatchInfo, rows: list, msg: Msg, box: Outbox) -> None:
        if info.dry_run or info.status == "cancelled":  # nothing goes to the provider
            status = "cancelled" if info.status == "cancelled" else "sent"
            for r in rows:
                box.out.append(info.id, r["seq"], status, attempts=0, domain=_domain(r["email"]))
            await box.flush(count=False)
            return
        await self._deliver(info, rows, msg, box)
        await box.flush()  # what the last call left: a cancel's rows, unbuildable ones

    async def _deliver(self, info: BatchInfo, rows: list, msg: Msg, box: Outbox) -> None:
        """Provider calls with retries, until every row has a result or the batch stops
        sending (paused: the rest stays ``queued``; cancelled: the rest is ``cancelled``).
        The results of each call are flushed (``Outbox``) before the next call starts."""
        route = await self._route(info, rows, box)
        if route is None:
            return
        provider, configured = route.provider, route.rate
        # Provider calls of at most half the burst, and the bucket one call smaller than the
        # burst: a call that leaves late (a busy machine) then still fits the provider's
        # limit of rate + burst in any second, measured at the provider (bench/rate.py).
        # Never more than the tenant's or the system's burst: a reservation larger than a
        # bucket's burst would wait for ever.
        bursts = (self._tenant_rate(info).burst, self.settings.system_rate.burst)
        step = max(1, min(provider.max_per_call, configured.burst // 2, *bursts))
        rate = Rate(configured.per_second, max(step, configured.burst - step))
        pending = list(rows)
        attempt = 1
        hold: Hold | None = None  # the account cannot send more now: the batch waits
        while pending:
            retry, retry_after, throttled = [], 0.0, 0
            for start in range(0, len(pending), step):
                part, messages = self._messages(info, pending[start : start + step], attempt, box)
                if not part:
                    continue
                if not await self._take_tokens(info, len(part), route.bucket, rate, box, msg):
                    self._stopped(info, box.out, part + pending[start + step :] + retry)
                    return
                if route.daily_quota is not None:
                    allowed = await self._allowed_today(route, len(part))
                    if allowed < len(part):
                        hold = _quota_hold(route.daily_quota)
                        part, messages = part[:allowed], messages[:allowed]
                        if not part:
                            break
                answers, elapsed = await route.send(messages)
                metrics.SEND_SECONDS.labels(info.provider).observe(elapsed)
                latency_ms = int(elapsed * 1000)
                throttled_now, wait_now = False, 0.0  # what this call's answers said
                if len(answers) == len(part) and all(  # most calls: every message accepted
                    answer.ok and not answer.throttled for answer in answers
                ):
                    box.out.extend_sent(
                        info.id,
                        [row["seq"] for row in part],
                        [answer.provider_message_id for answer in answers],
                        attempt,
                        latency_ms,
                        [_domain(row["email"]) for row in part],
                    )
                else:
                    for row, answer in zip(part, answers, strict=True):
                        ok = answer.ok
                        if answer.throttled:
                            throttled_now = True
                            wait_now = max(wait_now, answer.retry_after or 0.0)
                        if not ok and (answer.hold or answer.pause_reason):
                            hold = hold or _provider_hold(answer)  # the row stays queued
                            continue
                        if (
                            not ok
                            and answer.retryable
                            and attempt < self.settings.send_max_attempts
                        ):
                            retry.append(row)
                            retry_after = max(retry_after, answer.retry_after or 0.0)
                            throttled += answer.throttled
                            continue
                        box.out.append(
                            info.id,
                            row["seq"],
                            "sent" if ok else "failed",
                            provider_message_id=answer.provider_message_id if ok else None,
                            error=None if ok else answer.error,
                            attempts=attempt,
                            latency_ms=latency_ms,
                            domain=_domain(row["email"]),
                        )
                        if not ok and answer.retryable:
                            box.dead_letter(EXHAUSTED, row["seq"], answer.error, attempt)
                await box.flush()
                if hold is not None:
                    break
                if route.adapts and throttled_now and wait_now > 0:
                    await self.buckets.hold(route.bucket, rate, wait_now)
            if hold is not None:
                await self._hold(info, hold)  # unsent and retried rows stay queued
                return
            if retry:
                _count_retries(info.provider, len(retry), throttled)
                await self.cells.mark(box.claim)  # the bits of what is published, before waiting
            if retry and not await self._backoff(info, attempt, retry_after, msg):
                self._stopped(info, box.out, retry)
                return
            attempt += 1
            pending = retry

    async def _route(self, info: BatchInfo, rows: list, box: Outbox) -> Route | None:
        """The batch's route; None when its provider account is gone or unusable: then
        its rows are ``failed`` with the reason here (a replay from the DLQ sends them once
        the account is back)."""
        if info.account_id is None:
            return self.routes.default(info.provider)
        try:
            route = await self.routes.account(info.account_id)
            error = None if route is not None else "the provider account was deleted"
        except ValueError as exc:
            route, error = None, f"the provider account cannot be used: {exc}"
        if route is not None:
            return route
        for r in rows:
            box.out.append(
                info.id, r["seq"], "failed", error=error, attempts=0, domain=_domain(r["email"])
            )
            box.dead_letter(error, r["seq"], error, 0)
        return None

    async def _allowed_today(self, route: Route, n: int) -> int:
        day, _ = quota_window()
        return await self.quota.take(f"{route.quota_key}:{day}", n, route.daily_quota or 0)

    async def _hold(self, info: BatchInfo, hold: Hold) -> None:
        """Pause the batch for ``hold`` (its unsent recipients stay ``queued``; the leader
        resumes it at ``hold.resume_at`` when there is one)."""
        paused = await lifecycle.pause(
            self.services.pool, info.tenant_id, uuid.UUID(info.id), hold.reason, hold.resume_at
        )
        info.status = "paused"
        if paused:
            log.warning(
                "batch held: %s",
                hold.reason,
                extra={"resume_at": hold.resume_at.isoformat() if hold.resume_at else None},
            )

    def _stopped(self, info: BatchInfo, out: Columns, unsent: list) -> None:
        """The batch was paused or cancelled mid-chunk: a cancel ends the unsent recipients
        here; a pause leaves them ``queued`` for the resume."""
        if info.status == "cancelled":
            for r in unsent:
                out.append(info.id, r["seq"], "cancelled", attempts=0, domain=_domain(r["email"]))

    def _count(self, info: BatchInfo, out: Columns) -> None:
        sent, failed = out.status.count("sent"), out.status.count("failed")
        metrics.EMAILS.labels(info.provider, "sent").inc(sent)
        if failed:
            metrics.EMAILS.labels(info.provider, "failed").inc(failed)

    def _messages(
        self, info: BatchInfo, rows: list, attempt: int, box: Outbox
    ) -> tuple[list, list[Message]]:
        """The rows whose message could be built, and their messages. A row whose message
        cannot be built is ``failed`` with the reason here: it would fail the same way on
        every attempt (templates come from clients, so any error rendering one is theirs)."""
        built, messages = [], []
        links = suppressions.links(self.public_url, self.settings.unsubscribe_secret, info.id)
        for row in rows:
            try:
                messages.append(build_message(info, row, links))
            except Exception as exc:
                error = f"message could not be built: {deadletters.reason_of(exc)}"
                box.out.append(
                    info.id,
                    row["seq"],
                    "failed",
                    error=error,
                    attempts=attempt,
                    domain=_domain(row["email"]),
                )
                box.dead_letter(UNBUILDABLE, row["seq"], error, attempt)
            else:
                built.append(row)
        return built, messages

    async def _still_sending(self, info: BatchInfo) -> bool:
        await self.batches.get(info.id)  # refreshes ``info`` in place when it is a second old
        return info.sending

    def _tenant_rate(self, info: BatchInfo) -> Rate:
        return info.tenant_rate or self.settings.tenant_rate

    async def _take_tokens(
        self, info: BatchInfo, n: int, bucket: str, rate: Rate, box: Outbox, msg: Msg
    ) -> bool:
        """Reserve ``n`` tokens in all three buckets (``bucket``: the provider account's),
        keeping the chunk alive while waiting; False (nothing taken) once the batch is no
        longer sending. The first reservation also sets the done bits of the results the
        chunk published since its last one (``Cells.published``)."""
        key = self.services.key
        buckets = [  # in the order of BUCKETS
            (key("rl", "system"), self.settings.system_rate),
            (bucket, rate),
            (key("rl", "tenant", info.tenant_id), self._tenant_rate(info)),
        ]
        waited = 0.0
        held_by = None
        while await self._still_sending(info):
            reservation = await self.buckets.reserve(n, buckets, self.cells.take_bits(box.claim))
            if reservation.held_by is not None:
                held_by = reservation.held_by
            if reservation.granted:
                if reservation.wait > 0:
                    await asyncio.sleep(reservation.wait)
                waited += reservation.wait
                metrics.RATE_LIMIT_WAIT.labels(info.provider).observe(waited)
                if held_by is not None:
                    metrics.RATE_LIMIT_WAITS.labels(BUCKETS[held_by]).inc()
                    metrics.RATE_LIMIT_TOKENS_WAITED.labels(BUCKETS[held_by]).inc(n)
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
        await deadletters.chunk(self.services, msg.data, reason)
        await msg.term()


def build_message(info: BatchInfo, row: Mapping[str, Any], links: UnsubscribeLinks) -> Message:
    """The personalised message of one recipient (``row``: email, name, vars, seq).

    Its header fields are header-safe (``providers.base``): the rendered subject and the
    recipient's name pass ``header_safe`` here, once per recipient, and the addresses
    ``check_address``; the batch's sender name was made safe when the batch was read
    (``BatchCache``); the custom headers are safe by construction (a header-safe
    ``public_url``, a base64url token, the ref), so no time goes into checking them.
    Raises what the template raises for this recipient's values, and ``ValueError``.
    """
    email, name, seq = row["email"], row["name"], row["seq"]
    rendered = info.template.render(email, name, row["vars"])
    ref = f"{info.id}:{seq}"
    return Message(
        ref,
        check_address(email),
        header_safe(name) if name else name,
        check_address(info.from_email),
        info.from_name,
        header_safe(rendered.subject),
        rendered.html,
        rendered.text,
        links.headers(seq, ref),
    )


class Outbox:
    """A chunk's results on their way out, flushed after every provider call: dead letters
    first, then the results published to NATS, then their done bits set (by the next
    Dragonfly call: ``Cells.published``). A worker killed
    mid-chunk can so send again at most the recipients of the call it was making; a cell
    may hold many calls (``engine.chunks.cell_size``)."""

    __slots__ = ("sender", "info", "claim", "out", "dead")

    def __init__(self, sender: Sender, info: BatchInfo, claim: Claim) -> None:
        self.sender, self.info, self.claim = sender, info, claim
        self.out = Columns()
        self.dead: dict[str, list[tuple[int, str | None, int]]] = {}  # reason -> entries

    def dead_letter(self, reason: str, seq: int, error: str | None, attempts: int) -> None:
        self.dead.setdefault(reason, []).append((seq, error, attempts))

    async def flush(self, *, count: bool = True) -> None:
        if not self.out:
            return
        sender, info, out = self.sender, self.info, self.out
        for reason, entries in self.dead.items():
            await deadletters.send(
                sender.services, info.id, info.tenant_id, info.provider, reason, entries
            )
        await results.publish(sender.services, info.tenant_id, info.provider, out)
        sender.cells.published(self.claim, out.seq)
        if count:
            sender._count(info, out)
        self.out, self.dead = Columns(), {}


UNBUILDABLE = "the message could not be built"
EXHAUSTED = "retryable provider errors past the retry budget"


@dataclass(frozen=True, slots=True)
class Hold:
    """Why an account cannot send more now, and when it can again (None: an operator's
    resume, after the account is fixed)."""

    reason: str
    resume_at: datetime | None


def _quota_hold(quota: int) -> Hold:
    _, reopens = quota_window()
    return Hold(f"the provider account's daily quota of {quota} is used up", reopens)


def _provider_hold(answer: SendResult) -> Hold:
    if answer.pause_reason:
        return Hold(f"the provider refused the account: {answer.pause_reason}", None)
    resume_at = datetime.now(UTC) + timedelta(seconds=PROVIDER_HOLD_SECONDS)
    return Hold(f"the provider's sending quota is used up: {answer.error or 'held'}", resume_at)


def _count_retries(provider: str, retried: int, throttled: int) -> None:
    if throttled:
        metrics.RETRIES.labels(provider, "throttled").inc(throttled)
    if retried > throttled:
        metrics.RETRIES.labels(provider, "error").inc(retried - throttled)


def _domain(email: str) -> str:
    return email.rpartition("@")[2].lower()
