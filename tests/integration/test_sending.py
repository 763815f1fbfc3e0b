"""A cell holds many provider calls (``engine.chunks.cell_size``); the sender publishes
each call's results and sets their done bits before the next call, so a worker killed
mid-chunk can send again only the call it was making. The worker's loops run in-process
on the real NATS, PostgreSQL and Dragonfly, with the mock provider on a loopback port."""

from __future__ import annotations

import uuid

from engine.chunks import cell_size
from engine.results import decode
from engine.services import Services
from providers.mock import MockProvider
from tests.integration.test_poison import mock_server, new_batch, send_until_completed


async def test_a_cell_of_many_calls_publishes_every_call_on_its_own(
    own: Services, tenant: tuple[str, str]
) -> None:
    tenant_id, _ = tenant
    cell = cell_size(MockProvider.max_per_call)
    assert cell == 10 * MockProvider.max_per_call  # 1,000 recipients, 10 calls of 100
    people = [{"email": f"p{i}@example.com"} for i in range(cell + 30)]
    batch_id = await new_batch(own, tenant_id, people)
    async with mock_server() as url:
        await send_until_completed(own, batch_id, url)
    stream = own.topology.results_stream
    last = (await own.js.stream_info(stream)).state.last_seq
    sizes = []
    for seq in range(1, last + 1):
        message = decode((await own.js.get_msg(stream, seq)).data)
        if message.columns.batch_id and message.columns.batch_id[0] == batch_id:
            sizes.append(len(message.columns))
    assert sorted(sizes) == [30] + [100] * 10  # one results message per provider call
    done = await own.redis.bitcount(own.key("done", batch_id))
    assert done == cell + 30
    sent = await own.pool.fetchval(
        "SELECT count(*) FROM recipient_statuses WHERE batch_id = $1 AND status = 'sent'",
        uuid.UUID(batch_id),
    )
    assert sent == cell + 30
