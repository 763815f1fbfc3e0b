"""One worker process: its own uvloop event loop, connections and pull consumers.

Six loops share the process: ``send`` (chunks, up to ``WORKER_CONCURRENCY`` at once:
``engine.sender``), ``results-pg`` (recipient statuses: ``engine.results``), ``results-ch``
(ClickHouse events: ``engine.event_writer``), ``intake`` (batches published to NATS:
``engine.intake.from_nats``), the leader's chores (``engine.leader``) and customers' event
webhooks (``results-hooks``: ``engine.webhook_outbox``, ``engine.webhook_deliveries``). A
heartbeat file touched by the event loop itself tells the supervisor the loop is alive.
SIGTERM drains: fetching stops, chunks in flight finish and publish their results, the
ClickHouse buffer and the webhook outbox are flushed, then the process exits.

No message is redelivered for ever: a message whose handling fails comes back after a
growing delay and is dead-lettered on its last allowed delivery (``engine.deadletters``,
``engine.topology.Redelivery``); a message that can never succeed (malformed, refused by
PostgreSQL) is dead-lettered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from engine import deadletters, leader, metrics, results, webhook_deliveries
from engine.config import Settings
from engine.deadletters import retry_or_give_up
from engine.event_writer import EventWriter
from engine.intake import from_nats
from engine.sender import BUCKETS, Sender
from engine.services import Services
from engine.topology import REDELIVERY, SEND_ACK_WAIT, Redelivery
from providers.registry import PROVIDERS

log = logging.getLogger(__name__)

# Results messages (one per chunk) applied to PostgreSQL in one transaction: large enough
# for few statements, small enough to keep a worker's memory low (bench/RESULTS.md).
RESULTS_FLUSH_MESSAGES = 500


class Worker:
    def __init__(
        self,
        settings: Settings,
        heartbeat_path: str | None = None,
        redelivery: Redelivery = REDELIVERY,
    ):
        self.settings = settings
        self.heartbeat_path = heartbeat_path
        self.redelivery = redelivery
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
        # The default accounts the environment configures; tenants' accounts are built as
        # their batches come (engine.routes).
        providers = {
            name: spec.build(self.settings)
            for name, spec in PROVIDERS.items()
            if spec.enabled(self.settings)
        }
        events = EventWriter(services, self.redelivery)
        metrics.initialise(PROVIDERS, deadletters.KINDS, BUCKETS)
        metrics.WORKER_PROCESSES.set(1)
        log.info("worker started", extra={"pid": os.getpid()})
        try:
            sender = self._sender = Sender(services, providers)
            topo = services.topology
            # A loop that fails takes the others down with it (TaskGroup); the process then
            # exits non-zero and the supervisor starts a fresh one.
            async with asyncio.TaskGroup() as loops:
                loops.create_task(self._send_loop(services.js, topo.send_stream, sender))
                loops.create_task(self._results_loop(services))
                loops.create_task(self._event_loop(services.js, topo.results_stream, events))
                loops.create_task(self._intake_loop(services))
                loops.create_task(leader.lead(services, sender.cells, self.stopping))
                loops.create_task(self._webhooks_loop(services))
        except BaseException:
            log.exception("worker loop failed; exiting")
            raise
        finally:
            metrics.WORKER_PROCESSES.set(0)
            events.close()
            if self._sender is not None:
                await self._sender.routes.close()
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

    @contextlib.asynccontextmanager
    async def _subscription(
        self, js: JetStreamContext, stream: str, durable: str
    ) -> AsyncIterator[JetStreamContext.PullSubscription]:
        """A pull subscription to a durable consumer, bound once NATS takes it, and
        unsubscribed at the end: nats-py's drain would otherwise wait on it until its
        timeout (the inbox of a fetch that timed out is never done)."""
        while True:
            try:
                psub = await js.pull_subscribe_bind(durable, stream)
                break
            except Exception as exc:
                log.warning("cannot bind %s/%s (%r); retrying", stream, durable, exc)
                await asyncio.sleep(1.0)
        try:
            yield psub
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _fetch(self, psub, size: int, wait: float = 1.0) -> list[Msg]:
        try:
            return await psub.fetch(size, timeout=wait)
        except TimeoutError:  # nothing came (nats-py raises its own or asyncio's)
            return []
        except Exception as exc:  # NATS restarting: wait and go on
            log.warning("fetch failed: %r", exc)
            await asyncio.sleep(0.5)
            return []

    async def _send_loop(self, js: JetStreamContext, stream: str, sender: Sender) -> None:
        limit = self.settings.worker_concurrency
        async with self._subscription(js, stream, "send") as psub:
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
        except Exception as exc:
            await retry_or_give_up("send", msg, exc, sender.give_up, self.redelivery)
        finally:
            metrics.CHUNKS_IN_FLIGHT.dec()

    async def _consume(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        fetch_size: int,
        handle: Callable[[list[Msg]], Awaitable[None]],
        give_up: Callable[[Msg, str], Awaitable[None]],
    ) -> None:
        """Fetch up to ``fetch_size`` messages at a time and ``handle`` them; when that
        raises, each message is retried or, on its last delivery, given up (``give_up``)."""
        async with self._subscription(js, stream, durable) as psub:
            while not self.stopping.is_set():
                msgs = await self._fetch(psub, fetch_size)
                if not msgs:
                    continue
                try:
                    await handle(msgs)
                except Exception as exc:
                    for msg in msgs:  # (an acknowledged one ignores the nak)
                        await retry_or_give_up(durable, msg, exc, give_up, self.redelivery)

    async def _results_loop(self, services: Services) -> None:
        await self._consume(
            services.js,
            services.topology.results_stream,
            "results-pg",
            RESULTS_FLUSH_MESSAGES,
            lambda msgs: results.apply_messages(services, msgs, self.redelivery),
            lambda msg, reason: results.give_up_message(services, msg, reason),
        )

    async def _webhooks_loop(self, services: Services) -> None:
        """Customers' event webhooks: what is to be posted is written from ``results-hooks``
        (acknowledged once written), and posted apart from it."""
        stream = services.topology.results_stream
        async with self._subscription(services.js, stream, "results-hooks") as psub:
            await webhook_deliveries.run(
                services,
                functools.partial(self._fetch, psub),
                self.stopping,
                redelivery=self.redelivery,
            )

    async def _intake_loop(self, services: Services) -> None:
        await self._consume(
            services.js,
            services.topology.intake_stream,
            "intake",
            1,
            lambda msgs: from_nats.handle(services, msgs),
            lambda msg, reason: from_nats.give_up(services, msg, reason),
        )

    async def _event_loop(self, js: JetStreamContext, stream: str, writer: EventWriter) -> None:
        async with self._subscription(js, stream, "results-ch") as psub:
            while not self.stopping.is_set():
                if not writer.full:
                    wait = self.settings.clickhouse_flush_seconds
                    if msgs := await self._fetch(psub, 500, wait=wait):
                        await writer.add_or_retry(msgs)
                if writer.due and not await writer.flush():
                    await self._sleep(min(30.0, 2.0**writer.failures))
        await writer.flush()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
