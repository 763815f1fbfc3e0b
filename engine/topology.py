"""The NATS JetStream layout: streams, subjects and durable pull consumers.

Every name derives from ``NATS_PREFIX`` so test sessions and the dev stack never share
streams. With the default prefix the public intake subject is ``batchsender.intake.{tenant}``.

| stream      | subjects                 | retention  | consumers                 |
|-------------|--------------------------|------------|---------------------------|
| ..._INTAKE  | {p}.intake.{tenant}      | work queue | intake                    |
| ..._SEND    | {p}.send.{provider}      | work queue | send                      |
| ..._RESULTS | {p}.results              | interest   | results-pg, results-ch,   |
|             |                          |            | results-hooks             |
| ..._DLQ     | {p}.dlq.{kind}           | limits     | (read by the API)         |

and one JetStream Object Store bucket, ``{P}_RECIPIENTS`` (stream ``OBJ_{P}_RECIPIENTS``):
the recipients of batches too large for one intake message (``engine.publisher``).
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.object_store import (
    OBJ_ALL_CHUNKS_PRE_TEMPLATE,
    OBJ_ALL_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

DAY = 86_400.0
# A replayed intake message is published under a new Nats-Msg-Id (the first one is still
# in JetStream's duplicate window) and carries its original id, the batch's external id,
# in this header (``engine.deadletters.replay``).
ORIGINAL_ID = "BatchSender-External-Id"
# A worker that dies holding chunks gives them back after this long; live workers keep
# their chunks with in_progress() every SEND_ACK_WAIT / 3 seconds (engine.worker).
SEND_ACK_WAIT = 15.0
# How long a large batch's recipients stay in the object store at most. The intake deletes
# them once the batch is recorded; this removes the others: those of a dead-lettered
# message (kept for a replay, about as long as its dead letter) and an upload no message
# refers to (its publisher died before publishing).
RECIPIENTS_TTL = 30 * DAY


@dataclass(frozen=True, slots=True)
class Redelivery:
    """How every consumer retries a message whose handling failed: back to NATS after
    ``base_delay * 2 ** (n - 1)`` seconds (at most ``max_delay``) following its n-th
    delivery, and dead-lettered on delivery ``max_deliveries`` if that fails too (see
    ``engine.deadletters``). With the defaults a message fails for about five minutes
    (2 + 4 + ... + 60 + 60 s) before it is given up.

    The consumers keep ``max_deliver=-1``: JetStream's own bound would stop delivering a
    message silently, with no dead letter and no reason, so the code gives up itself.
    """

    max_deliveries: int = 10
    base_delay: float = 2.0
    max_delay: float = 60.0

    def delay(self, delivered: int) -> float:
        """Seconds before a message that failed on its ``delivered``-th delivery returns."""
        return min(self.max_delay, self.base_delay * 2 ** min(max(delivered, 1) - 1, 30))

    def last(self, delivered: int) -> bool:
        """Whether a failure on this delivery is the last one allowed."""
        return delivered >= self.max_deliveries


REDELIVERY = Redelivery()


@dataclass(frozen=True, slots=True)
class Topology:
    prefix: str
    replicas: int = 1  # NATS_REPLICAS: copies of every stream on a NATS cluster

    # subjects
    def intake_subject(self, tenant_id: str) -> str:
        return f"{self.prefix}.intake.{tenant_id}"

    def send_subject(self, provider: str) -> str:
        return f"{self.prefix}.send.{provider}"

    @property
    def results_subject(self) -> str:
        return f"{self.prefix}.results"

    def dlq_subject(self, kind: str) -> str:
        return f"{self.prefix}.dlq.{kind}"

    # streams
    def stream(self, kind: str) -> str:
        return f"{self.prefix.upper()}_{kind}"

    @property
    def intake_stream(self) -> str:
        return self.stream("INTAKE")

    @property
    def send_stream(self) -> str:
        return self.stream("SEND")

    @property
    def results_stream(self) -> str:
        return self.stream("RESULTS")

    @property
    def dlq_stream(self) -> str:
        return self.stream("DLQ")

    @property
    def recipients_bucket(self) -> str:
        """The Object Store bucket of large batches' recipients (``engine.publisher``)."""
        return self.stream("RECIPIENTS")

    def stream_configs(self) -> list[StreamConfig]:
        p = self.prefix
        return [
            StreamConfig(
                name=self.intake_stream,
                subjects=[f"{p}.intake.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                duplicate_window=DAY,  # Nats-Msg-Id de-duplication for publishers
                max_msg_size=64 << 20,
            ),
            StreamConfig(
                name=self.send_stream,
                subjects=[f"{p}.send.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                duplicate_window=600.0,
            ),
            StreamConfig(
                name=self.results_stream,
                subjects=[self.results_subject],
                retention=RetentionPolicy.INTEREST,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                duplicate_window=DAY,  # webhook event ids
            ),
            StreamConfig(
                name=self.dlq_stream,
                subjects=[f"{p}.dlq.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                max_age=30 * DAY,
            ),
            # The bucket as nats-py's create_object_store (and Go's) would make it; here
            # so that every process creates and updates it like the streams.
            StreamConfig(
                name=OBJ_STREAM_TEMPLATE.format(bucket=self.recipients_bucket),
                subjects=[
                    OBJ_ALL_CHUNKS_PRE_TEMPLATE.format(bucket=self.recipients_bucket),
                    OBJ_ALL_META_PRE_TEMPLATE.format(bucket=self.recipients_bucket),
                ],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                max_age=RECIPIENTS_TTL,
                discard=DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
                allow_direct=True,
            ),
        ]

    def consumer_configs(self) -> dict[str, list[ConsumerConfig]]:
        def pull(name: str, ack_wait: float, max_ack_pending: int) -> ConsumerConfig:
            return ConsumerConfig(
                durable_name=name,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait,
                max_deliver=-1,  # bounded by the code, with a dead letter: see Redelivery
                max_ack_pending=max_ack_pending,
                max_waiting=4096,
            )

        return {
            self.intake_stream: [pull("intake", 300.0, 1_000)],
            self.send_stream: [pull("send", SEND_ACK_WAIT, 20_000)],
            self.results_stream: [
                pull("results-pg", 60.0, 200_000),
                pull("results-ch", 120.0, 200_000),
                # Customers' event webhooks (engine.webhook_outbox): its own consumer, so
                # a slow one never holds up the status writer (interest retention keeps a
                # message until every consumer has acknowledged it).
                pull("results-hooks", 60.0, 20_000),
            ],
        }

    def consumers(self) -> list[tuple[str, str]]:
        """(stream, consumer) pairs, e.g. for queue-depth metrics."""
        return [(s, c.durable_name or "") for s, cs in self.consumer_configs().items() for c in cs]


async def ensure_topology(js: JetStreamContext, topology: Topology) -> None:
    """Create or update every stream and consumer; safe to run from every process."""
    for config in topology.stream_configs():
        try:
            await js.stream_info(config.name)
            await js.update_stream(config)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError:  # created concurrently by another process
                await js.update_stream(config)
    for stream, configs in topology.consumer_configs().items():
        for config in configs:
            await js.add_consumer(stream, config)


async def delete_topology(js: JetStreamContext, topology: Topology) -> None:
    """Remove every stream and the bucket (tests clean up with this)."""
    for config in topology.stream_configs():
        try:
            await js.delete_stream(config.name)
        except NotFoundError:
            pass
