"""The publisher helper against the real NATS server."""

from __future__ import annotations

import pytest

from engine.publisher import BatchRequest, Publisher, Recipient
from engine.services import Services


def _request(count: int) -> BatchRequest:
    return BatchRequest(
        name="p", from_email="p@example.com", subject="Hi", text="x", provider="mock",
        recipients=[Recipient(f"user{i}@example.com", f"User {i}") for i in range(count)],
    )  # fmt: skip


async def test_a_batch_larger_than_one_nats_message_is_refused_clearly(services: Services):
    publisher = await Publisher.connect(services.settings.nats_url, services.settings.nats_prefix)
    try:
        with pytest.raises(ValueError, match="send large batches over REST"):
            await publisher.publish("acme", _request(40_000), "too-big")
    finally:
        await publisher.close()


async def test_publish_twice_is_one_message(services: Services):
    publisher = await Publisher.connect(services.settings.nats_url, services.settings.nats_prefix)
    try:
        first = await publisher.publish("acme", _request(3), "same-id")
        again = await publisher.publish("acme", _request(3), "same-id")
    finally:
        await publisher.close()
    assert first.stream == services.topology.intake_stream
    assert not first.duplicate and again.duplicate
    assert first.seq == again.seq
    with pytest.raises(ValueError, match="msg_id is required"):
        await publisher.publish("acme", _request(1), "")
