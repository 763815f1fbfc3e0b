"""The publisher helper against the real NATS server."""

from __future__ import annotations

import orjson
import pytest
from nats.js.object_store import OBJ_STREAM_TEMPLATE

from engine.publisher import BatchRequest, Publisher, Recipient
from engine.services import Services


def _request(count: int) -> BatchRequest:
    return BatchRequest(
        name="p", from_email="p@example.com", subject="Hi", text="x", provider="mock",
        recipients=[Recipient(f"user{i}@example.com", f"User {i}") for i in range(count)],
    )  # fmt: skip


async def test_a_small_batch_is_one_message_with_its_recipients_inline(own: Services):
    publisher = await Publisher.connect(own.settings.nats_url, own.settings.nats_prefix)
    try:
        await publisher.publish("acme", _request(3), "small")
    finally:
        await publisher.close()
    msg = await own.js.get_last_msg(own.topology.intake_stream, own.topology.intake_subject("acme"))
    body = orjson.loads(msg.data)
    assert "recipients_object" not in body
    assert body["recipients"][2] == {"email": "user2@example.com", "name": "User 2"}
    assert (await own.js.stream_info(_bucket_stream(own))).state.messages == 0


async def test_a_batch_that_fills_one_message_with_its_headers_goes_to_the_object_store(
    own: Services,
):
    """NATS counts the headers in max_payload (and closes the connection of a client that
    sends more): a body that fits alone but not with its msg id is uploaded."""
    publisher = await Publisher.connect(own.settings.nats_url, own.settings.nats_prefix)
    limit = publisher._nc.max_payload
    request = _request(limit // 40)  # each recipient is over 40 bytes of JSON
    over = len(request.to_json()) - (limit - 10)
    while over > 0:  # a recipient takes its JSON and a comma
        over -= len(orjson.dumps(request.recipients.pop().as_dict())) + 1
    request.recipients[-1].name += "x" * -over
    assert len(request.to_json()) == limit - 10  # fits alone, not with the msg id
    try:
        ack = await publisher.publish("acme", request, "just-too-big")
    finally:
        await publisher.close()
    assert not ack.duplicate
    msg = await own.js.get_last_msg(own.topology.intake_stream, own.topology.intake_subject("acme"))
    assert "recipients" not in orjson.loads(msg.data)
    assert orjson.loads(msg.data)["recipients_object"]["count"] == len(request.recipients)


async def test_a_batch_whose_fields_alone_are_too_large_is_refused_before_any_upload(
    own: Services,
):
    request = _request(3)
    request.html = "<p>" + "x" * (1 << 20)
    publisher = await Publisher.connect(own.settings.nats_url, own.settings.nats_prefix)
    try:
        with pytest.raises(ValueError, match="the batch's fields alone take over"):
            await publisher.publish("acme", request, "fields-too-big")
    finally:
        await publisher.close()
    assert (await own.js.stream_info(_bucket_stream(own))).state.messages == 0
    assert (await own.js.stream_info(own.topology.intake_stream)).state.messages == 0


def _bucket_stream(services: Services) -> str:
    return OBJ_STREAM_TEMPLATE.format(bucket=services.topology.recipients_bucket)


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
