"""Provider webhooks: verify the provider's signature, parse, hand the events to NATS.

How a provider's posts are signed and read, and with which secret, is its
``ProviderSpec.webhook`` (``providers.registry.WEBHOOKS``); what is done here is the same
for every provider.

Events become results rows (``delivered``, ``bounced``, ``complained``) on the RESULTS
stream, where the status writer and the ClickHouse writer pick them up like send results.
The message id is a digest of the body, so a provider's retry of the same post is
dropped by JetStream; applying an event twice changes nothing anyway.

A post is signed over its timestamp and body. One signed more than ``TOLERANCE_SECONDS``
from this server's clock is refused (401 ``stale_signature``), and so is a signature
already received (401 ``replayed_signature``): each accepted signature is remembered in
Dragonfly (SET NX) for the whole time its timestamp would still be accepted. A provider's
own retry signs again with a new timestamp, so only a copy is refused. A provider has a
route only where it has a webhook and is enabled (``Settings.provider_enabled``).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping

from engine import metrics, results
from engine.errors import BadRequest, NotFound, Unauthorized
from engine.results import Columns
from engine.services import Services
from providers.registry import WEBHOOKS

TOLERANCE_SECONDS = 300


async def receive(
    services: Services, provider: str, body: bytes, headers: Mapping[str, str]
) -> int:
    """Accept one webhook post; return the number of events handed on."""
    settings = services.settings
    webhook = WEBHOOKS.get(provider)
    if webhook is None or not settings.provider_enabled(provider):
        raise NotFound(f"no webhook endpoint for provider {provider!r}", code="unknown_provider")
    signed = webhook.verify(body, headers, webhook.secret(settings))
    if signed is None:
        raise Unauthorized("the webhook signature does not verify", code="bad_signature")
    if abs(time.time() - signed.timestamp) > TOLERANCE_SECONDS:
        raise Unauthorized(
            f"the webhook was signed more than {TOLERANCE_SECONDS} seconds from now",
            code="stale_signature",
        )
    try:
        events = webhook.parse(body)
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid_webhook") from None
    columns = Columns()
    known: set[str] = set()  # batch ids seen valid in this post
    counts: dict[str, int] = {}
    for event in events:
        batch_id, _, seq = event.ref.partition(":")
        try:
            if batch_id not in known:
                uuid.UUID(batch_id)
                known.add(batch_id)
            columns.append(
                batch_id,
                int(seq),
                event.event,
                provider_message_id=event.provider_message_id,
                attempts=0,
                domain=(event.email or "").rpartition("@")[2].lower(),
            )
        except ValueError:
            raise BadRequest(
                f"event {event.event_id!r} has an unknown ref {event.ref!r}", code="invalid_webhook"
            ) from None
        counts[event.event] = counts.get(event.event, 0) + 1
    seen = services.key(
        "webhook-seen", provider, hashlib.sha256(signed.signature.encode()).hexdigest()
    )
    if not await services.redis.set(seen, b"1", nx=True, ex=2 * TOLERANCE_SECONDS):
        raise Unauthorized("this webhook post was already received", code="replayed_signature")
    try:
        if columns:
            digest = hashlib.sha256(body).hexdigest()
            await results.publish(
                services, None, provider, columns, msg_id=f"webhook:{provider}:{digest}"
            )
    except BaseException:
        await services.redis.delete(seen)  # not handed on: the provider may post it again
        raise
    for event_type, count in counts.items():
        metrics.WEBHOOKS.labels(provider, event_type).inc(count)
    return len(columns)
