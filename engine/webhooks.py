"""Provider webhooks: verify the provider's signature, parse, hand the events to NATS.

Events become results rows (``delivered``, ``bounced``, ``complained``) on the RESULTS
stream, where the status writer and the ClickHouse writer pick them up like send results.
The message id is a digest of the body, so a provider's retry of the same post is
dropped by JetStream; applying an event twice changes nothing anyway.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping

from engine import metrics, results
from engine.errors import BadRequest, NotFound, Unauthorized
from engine.results import Columns
from engine.services import Services
from providers import mock

WEBHOOK_PROVIDERS = ("mock",)


async def receive(
    services: Services, provider: str, body: bytes, headers: Mapping[str, str]
) -> int:
    """Accept one webhook post; return the number of events handed on."""
    if provider not in WEBHOOK_PROVIDERS:
        raise NotFound(f"no webhook endpoint for provider {provider!r}", code="unknown_provider")
    if not mock.verify_signature(
        body, headers.get("X-Mock-Signature"), services.settings.mock_webhook_secret
    ):
        raise Unauthorized("the webhook signature does not verify", code="bad_signature")
    try:
        events = mock.parse_webhook(body)
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
            columns.append(batch_id, int(seq), event.event, event.provider_message_id, None, 0, 0,
                           (event.email or "").rpartition("@")[2].lower())  # fmt: skip
        except ValueError:
            raise BadRequest(
                f"event {event.event_id!r} has an unknown ref {event.ref!r}", code="invalid_webhook"
            ) from None
        counts[event.event] = counts.get(event.event, 0) + 1
    if columns:
        digest = hashlib.sha256(body).hexdigest()
        await results.publish(
            services, None, provider, columns, msg_id=f"webhook:{provider}:{digest}"
        )
    for event_type, count in counts.items():
        metrics.WEBHOOKS.labels(provider, event_type).inc(count)
    return len(columns)
