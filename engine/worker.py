"""One worker process: its own uvloop event loop, connections and pull consumers.

Four loops share the process: ``send`` (chunks, up to ``WORKER_CONCURRENCY`` at once),
``results-pg`` (recipient statuses), ``results-ch`` (ClickHouse events) and ``intake``
(batches published to NATS). A heartbeat file touched by the event loop itself tells the
supervisor the loop is alive. SIGTERM drains: fetching stops, chunks in flight finish and
publish their results, the ClickHouse buffer is flushed, then the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from engine import metrics, recovery
from engine.adapters import AVAILABLE, build_provider
from engine.cells import Cells
from engine.config import Settings
from engine.errors import BatchSenderError, TooManyRequests
from engine.events import EventWriter
from engine.intake import create_from_nats
from engine.leader import Lease
from engine.queues import EXTERNAL_ID_HEADER
from engine.results import Columns, apply_results, decode
from engine.sender import Sender
from engine.services import Services
from engine.topology import SEND_ACK_WAIT

log = logging.getLogger(__name__)

# Results messages (one per chunk) applied to PostgreSQL in one transaction: large enough
# for few statements, small enough to keep a worker's memory low (bench/RESULTS.md).
RESULTS_FLUSH_MESSAGES = 500


class Worker:
    def __init__(self, settings: Settings, heartbeat_path: str | None = None):
        self.settings = settings
        self.heartbeat_path = heartbeat_path
        self.parent = os.getppid()  # the supervisor: when it is gone, this worker drains
        self.stopping = asyncio.Event()
        self._chunks: dict[asyncio.Task, Msg] = {}
        self._sender: Sender | None = None

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        heartbeat = asyncio.create_task(self._heartbeat())
        opening = asyncio.create_task(Services.open(self.settings, pool_size=8))
        stopped = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({opening, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done():  # told to stop while still connecting (a service is down)
            opening.cancel()
            heartbeat.cancel()
            return
        stopped.cancel()
        services = opening.result()
        providers = {name: build_provider(name, self.settings) for name in AVAILABLE}
        events = EventWriter(services)
        metrics.WORKER_PROCESSES.set(1)
        log.info("worker started", extra={"pid": os.getpid()})
        try:
            sender = self._sender = Sender(services, providers)
            topo = services.topology
            # A loop that fails takes the others down with it (TaskGroup); the process then
            # exits non-zero and the supervisor starts a fresh one.
            async with asyncio.TaskGroup() as loops:
                loops.create_task(self._send_loop(services.js, topo.send_stream, sender))
                loops.create_task(
                    self._consume(
                        services.js,
                        topo.results_stream,
                        "results-pg",
                        RESULTS_FLUSH_MESSAGES,
                        lambda msgs: self._apply_results(services, msgs),
                    )
                )
                loops.create_task(self._event_loop(services.js, topo.results_stream, events))
                loops.create_task(
                    self._consume(
                        services.js,
                        topo.intake_stream,
                        "intake",
                        1,
                        lambda msgs: self._intake(services, msgs),
                    )
                )
                loops.create_task(self._lead(services, sender.cells))  # fmt: skip
        except BaseException:
            log.exception("worker loop failed; exiting")
            raise
        finally:
            metrics.WORKER_PROCESSES.set(0)
            events.close()
            for provider in providers.values():
                with contextlib.suppress(Exception):
                    await provider.close()
            await services.close()
            heartbeat.cancel()
            log.info("worker stopped", extra={"pid": os.getpid()})

    async def _heartbeat(self) -> None:
        """Touch the heartbeat file, keep the chunks in flight from being redelivered and
        their cells leased, and drain when the supervisor is gone (killed with -9: nobody
        would stop this process)."""
        beats = 0
        while True:
            if self.heartbeat_path:
                os.utime(self.heartbeat_path)
            if os.getppid() != self.parent and not self.stopping.is_set():
                log.warning("supervisor gone; draining")
                self.stop()
            beats += 1
            if beats % int(SEND_ACK_WAIT / 3) == 0:
                for msg in list(self._chunks.values()):
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                if self._sender is not None:
                    with contextlib.suppress(Exception):
                        await self._sender.cells.renew()
            await asyncio.sleep(1.0)

    async def _subscribe(self, js: JetStreamContext, stream: str, durable: str):
        while True:
            try:
                return await js.pull_subscribe_bind(durable, stream)
            except Exception as exc:
                log.warning("cannot bind %s/%s (%r); retrying", stream, durable, exc)
                await asyncio.sleep(1.0)

    async def _fetch(self, psub, batch: int, wait: float = 1.0) -> list[Msg]:
        try:
            return await psub.fetch(batch, timeout=wait)
        except nats.errors.TimeoutError:
            return []
        except Exception as exc:  # NATS restarting: wait and go on
            log.warning("fetch failed: %r", exc)
            await asyncio.sleep(0.5)
            return []

    async def _send_loop(self, js: JetStreamContext, stream: str, sender: Sender) -> None:
        psub = await self._subscribe(js, stream, "send")
        limit = self.settings.worker_concurrency
        while not self.stopping.is_set():
            free = limit - len(self._chunks)
            if free <= 0:
                await asyncio.wait(self._chunks, return_when=asyncio.FIRST_COMPLETED)
                continue
            for msg in await self._fetch(psub, min(free, 64)):
                task = asyncio.create_task(self._chunk(sender, msg))
                self._chunks[task] = msg
                task.add_done_callback(self._chunks.pop)
        if self._chunks:  # drain: let chunks in flight finish and record their results
            await asyncio.wait(self._chunks, timeout=self.settings.drain_timeout)

    async def _chunk(self, sender: Sender, msg: Msg) -> None:
        metrics.CHUNKS_IN_FLIGHT.inc()
        try:
            await sender.process(msg)
        except Exception:
            log.exception("chunk failed; it will be redelivered")
            with contextlib.suppress(Exception):
                await msg.nak(delay=2.0)
        finally:
            metrics.CHUNKS_IN_FLIGHT.dec()

    async def _consume(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        batch: int,
        handle: Callable[[list[Msg]], Awaitable[None]],
    ) -> None:
        psub = await self._subscribe(js, stream, durable)
        while not self.stopping.is_set():
            msgs = await self._fetch(psub, batch)
            if not msgs:
                continue
            try:
                await handle(msgs)
            except Exception:
                log.exception(
                    "%s: handling %d messages failed; they will be redelivered", durable, len(msgs)
                )
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=2.0)

    async def _apply_results(self, services: Services, msgs: list[Msg]) -> None:
        columns = Columns()
        good = []
        for msg in msgs:
            try:
                columns.extend(decode(msg.data).columns)
                good.append(msg)
            except ValueError as exc:
                log.error("dropping malformed results message: %s", exc)
                await msg.term()
        if columns:
            async with services.pool.acquire() as conn:
                touched = await apply_results(conn, columns)
            metrics.STATUS_ROWS.inc(len(columns))
            for batch_id, status in touched:
                if status == "completed":
                    log.info("batch completed", extra={"batch_id": batch_id})
        for msg in good:
            await msg.ack()

    async def _event_loop(self, js: JetStreamContext, stream: str, writer: EventWriter) -> None:
        psub = await self._subscribe(js, stream, "results-ch")
        while not self.stopping.is_set():
            if not writer.full:
                msgs = await self._fetch(psub, 500, wait=self.settings.clickhouse_flush_seconds)
                if msgs:
                    await writer.add(msgs)
            if writer.due and not await writer.flush():
                await self._sleep(min(30.0, 2.0**writer.failures))
        await writer.flush()

    async def _intake(self, services: Services, msgs: list[Msg]) -> None:
        for msg in msgs:
            headers = msg.headers or {}
            # A replayed dead letter keeps its original id (see engine.queues.replay).
            msg_id = (headers.get(EXTERNAL_ID_HEADER) or headers.get("Nats-Msg-Id")
                      or f"seq:{msg.metadata.sequence.stream}")  # fmt: skip
            try:
                created = await create_from_nats(services, msg.subject, msg.data, msg_id)
            except BatchSenderError as exc:
                if isinstance(exc, TooManyRequests) and exc.code == "too_many_active_batches":
                    log.info("intake message waits: %s", exc.message)  # later, not never
                    await msg.nak(delay=exc.retry_after)
                    continue
                log.warning("intake message dead-lettered: %s", exc.message)
                await self._dead_letter_intake(services, msg, msg_id, exc)
                await msg.ack()
                continue
            log.info("intake batch recorded", extra={"batch_id": created.id, "msg_id": msg_id})
            await msg.ack()

    async def _dead_letter_intake(
        self, services: Services, msg: Msg, msg_id: str, exc: BatchSenderError
    ) -> None:
        body = orjson.dumps({
            "kind": "intake",
            "tenant_id": msg.subject.rsplit(".", 1)[-1],
            "reason": exc.message,
            "code": exc.code,
            "details": exc.details,
            "subject": msg.subject,
            "msg_id": msg_id,
            "data": msg.data.decode("utf-8", "replace"),
        })  # fmt: skip
        await services.js.publish(services.topology.dlq_subject("intake"), body)

    async def _lead(self, services: Services, cells: Cells) -> None:
        """Hold the leader lease when free and run the leader's chores while holding it."""
        lease = Lease(services.redis, services.key("leader"))
        tick = 0
        while not self.stopping.is_set():
            try:
                if await lease.hold():
                    await recovery.run(services, cells, tick)
                    tick += 1
            except Exception:
                log.exception("leader chores failed")
            await self._sleep(recovery.TICK)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
