"""The provider event vocabulary end to end, without services: what each provider's event
becomes on the results stream (engine.webhooks.RESULT_EVENTS), what that does to a
recipient (engine.lifecycle.PROVIDER_EVENTS, ranks), what suppresses, what analytics
lists, each provider's replay policy, the caches of the webhook route and the GET that
confirms a subscription."""

from __future__ import annotations

import time

import orjson
import pytest
from aiohttp import web

from engine import analytics, lifecycle, webhooks
from engine.results import Columns, _as_statuses
from engine.suppressions import SUPPRESSING
from providers import mailgun, mock, postmark, resend, sendgrid, ses
from providers.base import SIGNATURE_TOLERANCE, WEBHOOK_EVENTS
from tests.provider_support import closed_port

WORKER_RESULTS = {"sent", "failed", "cancelled"}  # what engine.sender and the leader publish


def test_every_provider_event_has_one_meaning_on_the_results_stream() -> None:
    assert set(webhooks.RESULT_EVENTS) == WEBHOOK_EVENTS
    produced = {name for name in webhooks.RESULT_EVENTS.values() if name is not None}
    assert produced == set(lifecycle.PROVIDER_EVENTS)
    # A provider's name never reads as one of the worker's own results.
    assert not produced & (WORKER_RESULTS | {"suppressed"})
    assert webhooks.RESULT_EVENTS["sent"] is None
    for refusal in ("dropped", "failed", "rejected", "suppressed"):
        assert webhooks.RESULT_EVENTS[refusal] == "dropped"


def test_the_table() -> None:
    """Provider event -> recipient status (None: unchanged), in one place each."""
    status = {
        event: (lifecycle.PROVIDER_EVENTS[name] if name else None)
        for event, name in webhooks.RESULT_EVENTS.items()
    }
    assert status == {
        "sent": None,
        "delivered": "delivered",
        "deferred": None,
        "bounced": "bounced",
        "soft_bounced": None,
        "dropped": "failed",
        "failed": "failed",
        "rejected": "failed",
        "suppressed": "failed",
        "complained": "complained",
        "opened": None,
        "clicked": None,
        "unsubscribed": None,
        "resubscribed": None,
    }


def test_statuses_are_recipient_statuses_and_ranked() -> None:
    assert set(lifecycle.AFTER_SEND) <= set(lifecycle.RECIPIENT_STATUSES)
    given = {s for s in lifecycle.PROVIDER_EVENTS.values() if s is not None}
    assert given <= set(lifecycle.AFTER_SEND) - {"sent"}
    rank = lifecycle.RANK
    assert rank["sent"] < rank["delivered"] < rank["failed"] < rank["bounced"] < rank["complained"]
    assert lifecycle.EVENT_ONLY == {
        "deferred", "soft_bounced", "opened", "clicked", "unsubscribed", "resubscribed"
    }  # fmt: skip


def test_suppressing_events_and_analytics_names() -> None:
    assert {"bounced", "complained", "unsubscribed"} == SUPPRESSING
    assert SUPPRESSING <= set(lifecycle.PROVIDER_EVENTS)
    assert "soft_bounced" not in SUPPRESSING
    assert set(lifecycle.PROVIDER_EVENTS) | {"sent", "failed"} == set(analytics.EVENT_TYPES)


def test_event_only_names_leave_the_final_statuses() -> None:
    columns = Columns()
    for seq, name in enumerate(["sent", "opened", "dropped", "delivered", "deferred", "failed"]):
        columns.append("b", seq, name)
    final = _as_statuses(columns)
    assert list(zip(final.seq, final.status, strict=True)) == [
        (0, "sent"), (2, "failed"), (3, "delivered"), (5, "failed"),
    ]  # fmt: skip


def test_the_mock_takes_every_name_of_the_vocabulary() -> None:
    body = orjson.dumps(
        [{"event": e, "ref": f"b:{i}", "event_id": e, "timestamp": 1} for i, e in enumerate(sorted(WEBHOOK_EVENTS))]
    )  # fmt: skip
    assert [e.event for e in mock.parse_webhook(body)] == sorted(WEBHOOK_EVENTS)


def test_each_providers_age_and_repeat_policy() -> None:
    assert ses.WEBHOOK.max_age == ses.MAX_AGE == 3600  # SNS retries its signed message
    assert ses.WEBHOOK.subscription is not None
    for webhook in (mock.SPEC.webhook, sendgrid.WEBHOOK, mailgun.WEBHOOK):
        assert webhook is not None
        assert webhook.max_age == SIGNATURE_TOLERANCE and not webhook.repeat_is_retry
    for webhook in (ses.WEBHOOK, postmark.WEBHOOK, resend.WEBHOOK):
        assert webhook.repeat_is_retry  # the replay key is the same in the provider's retries
    for webhook in (sendgrid.WEBHOOK, mailgun.WEBHOOK, postmark.WEBHOOK, resend.WEBHOOK):
        assert webhook.secret(object()) == "" and webhook.subscription is None


def test_the_answer() -> None:
    assert webhooks.Received(2, 1).answer() == {"accepted": 2, "ignored": 1}
    assert webhooks.Received(0, duplicate=True).answer() == {
        "accepted": 0, "ignored": 0, "duplicate": True,
    }  # fmt: skip
    assert webhooks.Received(0, subscribed=True).answer()["subscribed"] is True


def test_the_cache_keeps_the_last_entries_for_their_time() -> None:
    cache: webhooks.Cache[str, int | None] = webhooks.Cache(2, ttl=30)
    now = [1000.0]
    cache.clock = lambda: now[0]
    cache.put("a", 1)
    cache.put("b", None)  # a miss is kept too
    assert cache.get("b") is None and cache.get("a") == 1
    cache.put("c", 3)  # "b" was used least recently
    assert cache.get("b", "gone") == "gone" and cache.get("a") == 1
    now[0] += 30
    assert cache.get("a", "gone") == "gone"
    forever: webhooks.Cache[str, int] = webhooks.Cache(1)
    forever.put("x", 1)
    forever.clock = lambda: time.monotonic() + 1e9
    assert forever.get("x") == 1


async def test_confirming_a_subscription_wants_a_200_and_follows_no_redirect() -> None:
    asked: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(request.path_qs)
        if request.query.get("Token") == "moved":
            raise web.HTTPFound("/elsewhere?Token=ok")
        return web.Response(status=200 if request.query.get("Token") == "ok" else 403)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    port = closed_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}/?Action=ConfirmSubscription&Token="
    try:
        await webhooks.confirm_subscription(base + "ok")
        for token in ("refused", "moved"):
            with pytest.raises(webhooks.SubscriptionNotConfirmed):
                await webhooks.confirm_subscription(base + token)
    finally:
        await runner.cleanup()
    assert [q.rpartition("=")[2] for q in asked] == ["ok", "refused", "moved"]
    with pytest.raises(webhooks.SubscriptionNotConfirmed):
        await webhooks.confirm_subscription(base + "ok")  # nothing listens any more
