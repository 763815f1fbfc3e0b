"""Provider webhooks: verify the provider's signature, parse, hand the events to NATS.

How a provider's posts are signed and read is its ``ProviderSpec.webhook``
(``providers.registry.WEBHOOKS``); what is done here is the same for every provider. Two
routes take them:

- ``POST /webhooks/{provider}``: the server's default account of the provider, verified
  with the secret from the settings (``Webhook.secret``); only where the provider is
  enabled (``Settings.provider_enabled``). The providers without a default account
  (every one but mock) have no secret there, so nothing verifies.
- ``POST /webhooks/{provider}/{account_id}``: a tenant's provider account
  (``engine.accounts``), verified with that account's own webhook secret. 404
  ``account_not_found`` when there is no such account, it is another provider's, or it has
  no webhook secret. Opened secrets are kept ``SECRET_SECONDS`` (a post costs no query and
  no decrypt), so a deleted account's secret stops working within that time.

Whose events. A post that verifies with one account's secret is applied only to the
batches sent through that account (``batches.provider_account_id``; NULL for the default
account, the only ones the default route applies to), and of that provider. Otherwise a
tenant holding its own signing key could forge events for another tenant's batches. The
other events are ignored and counted in the answer (200: a provider would retry a refused
post for ever). Which account sent a batch never changes, so it is kept in process (the
last ``BATCH_CACHE_SIZE`` batches; a post about known batches costs no query).

The event vocabulary. Parsers name events in ``providers.base.WEBHOOK_EVENTS``;
``RESULT_EVENTS`` is what each becomes on the RESULTS stream, the ClickHouse event, and
``engine.lifecycle.PROVIDER_EVENTS`` what that does to a recipient in PostgreSQL:

| provider's event                     | on the stream | recipient status                        |
|--------------------------------------|---------------|-----------------------------------------|
| sent                                 | (none)        | (the worker publishes its own ``sent``) |
| delivered                            | delivered     | delivered                               |
| dropped, failed, rejected, suppressed| dropped       | failed, error ``<provider>: <event>``   |
| bounced                              | bounced       | bounced; the address suppressed         |
| complained                           | complained    | complained; the address suppressed      |
| unsubscribed                         | unsubscribed  | unchanged; the address suppressed       |
| deferred, soft_bounced               | the same      | unchanged                               |
| opened, clicked, resubscribed        | the same      | unchanged                               |

``failed`` and ``suppressed`` would otherwise read as the worker's own results (a send
that failed here; an address on the tenant's list), so a provider's refusal is one name.
A ``resubscribed`` lifts no suppression: the tenant's list is the tenant's to change.

Events become results rows on the RESULTS stream, where the status writer and the
ClickHouse writer pick them up like send results. The message id is a digest of the
bodies it carries, so the same message published again is dropped by JetStream; applying
an event twice changes nothing anyway.

A post is signed over its timestamp and body. One signed more than ``Webhook.max_age``
(``TOLERANCE_SECONDS`` unless the provider says otherwise: SNS an hour) from this server's
clock is refused (401 ``stale_signature``). Each accepted replay key (``Signed.signature``)
is remembered in Dragonfly (SET NX) for as long as its timestamp would still be accepted;
a post whose key was received before is a copy, refused (401 ``replayed_signature``), or,
where the provider re-sends what it signed once (``Webhook.repeat_is_retry``: SNS, Svix,
Postmark), its retry: 200 ``duplicate``, nothing handed on again. The posts that reach a
step in the same turn of the event loop take it together (``engine.turns``): their replay
keys in one Redis pipeline, their events in one results message per provider, each post
with its own answer (bench/RESULTS.md, webhook intake).

A subscription handshake (``Webhook.subscription``, SNS): a signed
``SubscriptionConfirmation`` for an allowed topic is confirmed by a GET of its
``SubscribeURL`` (only SNS's own, see ``providers.ses.subscribe_url``), through
``confirm_subscription``; an unsigned or foreign one is 401 and nothing is fetched.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp

from engine import accounts, metrics, results
from engine.errors import BadRequest, BatchSenderError, NotFound, Unauthorized
from engine.results import Columns
from engine.services import Services
from engine.turns import TurnBatch
from providers.base import SIGNATURE_TOLERANCE, WebhookEvent
from providers.registry import WEBHOOKS

log = logging.getLogger(__name__)

TOLERANCE_SECONDS = SIGNATURE_TOLERANCE
SECRET_SECONDS = 30.0  # how long an account's opened webhook secret is used unread
SECRET_CACHE_SIZE = 4096
BATCH_CACHE_SIZE = 10_000
CONFIRM_TIMEOUT_SECONDS = 10.0
MESSAGE_ROWS = 1000  # events per results message of posts handed on together (a chunk's)

# What each event of the provider vocabulary becomes on the RESULTS stream (None: nothing).
RESULT_EVENTS: dict[str, str | None] = {
    "sent": None,
    "delivered": "delivered",
    "deferred": "deferred",
    "bounced": "bounced",
    "soft_bounced": "soft_bounced",
    "dropped": "dropped",
    "failed": "dropped",
    "rejected": "dropped",
    "suppressed": "dropped",
    "complained": "complained",
    "opened": "opened",
    "clicked": "clicked",
    "unsubscribed": "unsubscribed",
    "resubscribed": "resubscribed",
}


class SubscriptionNotConfirmed(BatchSenderError):
    """The provider's confirmation URL did not answer 200: the post is not taken (the
    provider sends the confirmation again)."""

    status = 502
    code = "subscription_not_confirmed"


@dataclass(frozen=True, slots=True)
class Received:
    """What became of one post: events handed on, events ignored (the provider's ``sent``,
    events about batches not sent through this account), and whether it was a provider's
    retry of a post already received or a subscription confirmed."""

    accepted: int
    ignored: int = 0
    duplicate: bool = False
    subscribed: bool = False

    def answer(self) -> dict[str, Any]:
        body: dict[str, Any] = {"accepted": self.accepted, "ignored": self.ignored}
        if self.duplicate:
            body["duplicate"] = True
        if self.subscribed:
            body["subscribed"] = True
        return body


K = TypeVar("K")
V = TypeVar("V")
_MISSING: Any = object()


class Cache(Generic[K, V]):
    """The last ``size`` values by key, each for ``ttl`` seconds (None: while kept).
    ``clock`` is replaceable (tests move time on)."""

    def __init__(self, size: int, ttl: float | None = None) -> None:
        self.size = size
        self.ttl = ttl
        self.clock: Callable[[], float] = time.monotonic
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K, default: Any = _MISSING) -> V | Any:
        item = self._items.get(key)
        if item is None:
            return default
        if self.ttl is not None and self.clock() - item[0] >= self.ttl:
            del self._items[key]
            return default
        self._items.move_to_end(key)
        return item[1]

    def put(self, key: K, value: V) -> None:
        self._items[key] = (self.clock(), value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


async def _claim_keys(redis: Any, keys: list[tuple[str, int]]) -> list[Any]:
    """``SET key 1 NX EX ttl`` for each (key, ttl): True where it was not set."""
    if len(keys) == 1:
        key, ttl = keys[0]
        return [bool(await redis.set(key, b"1", nx=True, ex=ttl))]
    pipe = redis.pipeline(transaction=False)
    for key, ttl in keys:
        pipe.set(key, b"1", nx=True, ex=ttl)
    answers = await pipe.execute(raise_on_error=False)
    return [a if isinstance(a, BaseException) else bool(a) for a in answers]


async def _publish_events(services: Services, posts: list[tuple[str, Columns, str]]) -> list[Any]:
    """The events of the posts (provider, columns, body digest) that reached this point in
    one turn of the event loop, packed into results messages of one provider and at most
    ``MESSAGE_ROWS`` rows (a larger post alone): a message costs NATS and each of the three
    results consumers about as much whatever its rows (bench/RESULTS.md, webhook intake).
    A message's id is the digest of its posts' digests: the message published again (a
    retry) is dropped by JetStream; a post a provider sends again is caught by its replay
    key, and applying an event twice changes nothing anyway. A message that fails fails
    only its own posts."""
    answers: list[Any] = [None] * len(posts)
    packs: list[tuple[str, list[int]]] = []
    open_packs: dict[str, tuple[list[int], int]] = {}  # provider -> (posts, rows)
    for i, (provider, columns, _) in enumerate(posts):
        members, rows = open_packs.get(provider, ([], 0))
        if members and rows + len(columns) > MESSAGE_ROWS:
            packs.append((provider, members))
            members, rows = [], 0
        members.append(i)
        open_packs[provider] = (members, rows + len(columns))
    packs += [(provider, members) for provider, (members, _) in open_packs.items()]

    async def publish(provider: str, members: list[int]) -> None:
        if len(members) == 1:
            _, columns, digest = posts[members[0]]
        else:
            columns = Columns()
            for i in members:
                columns.extend(posts[i][1])
            digest = hashlib.sha256("".join(posts[i][2] for i in members).encode()).hexdigest()
        try:
            await results.publish(
                services, None, provider, columns, msg_id=f"webhook:{provider}:{digest}"
            )
        except Exception as exc:
            for i in members:
                answers[i] = exc

    await asyncio.gather(*(publish(provider, members) for provider, members in packs))
    return answers


# The replay keys claimed and the events handed on in one turn of the event loop go
# together: one Redis pipeline, one results message per provider (engine.turns).
CLAIM_KEY: TurnBatch[tuple[str, int], bool] = TurnBatch(_claim_keys)
PUBLISH_EVENTS: TurnBatch[tuple[str, Columns, str], None] = TurnBatch(_publish_events)

# Account id -> its opened webhook secret, or None (no such account, or no secret).
ACCOUNT_SECRETS: Cache[uuid.UUID, accounts.WebhookSecret | None] = Cache(
    SECRET_CACHE_SIZE, SECRET_SECONDS
)
# Batch id -> (provider, account id or None for the default account), or None: no such
# batch. Neither changes once a batch exists, and events come only after it exists.
BATCH_OWNERS: Cache[str, tuple[str, uuid.UUID | None] | None] = Cache(BATCH_CACHE_SIZE)


async def receive(
    services: Services,
    provider: str,
    body: bytes,
    headers: Mapping[str, str],
    account_id: str | None = None,
) -> Received:
    """Accept one webhook post for the default account of ``provider``, or for the
    provider account ``account_id``."""
    webhook = WEBHOOKS.get(provider)
    if webhook is None or (account_id is None and not services.settings.provider_enabled(provider)):
        raise NotFound(f"no webhook endpoint for provider {provider!r}", code="unknown_provider")
    if account_id is None:
        account, secret = None, webhook.secret(services.settings)
    else:
        account = _account_uuid(account_id)
        found = await _account_secret(services, account)
        if found is None or found.provider != provider:
            raise NotFound("no such provider account with a webhook", code="account_not_found")
        secret = found.secret
    signed = webhook.verify(body, headers, secret)
    if inspect.isawaitable(signed):
        signed = await signed
    if signed is None:
        raise Unauthorized("the webhook signature does not verify", code="bad_signature")
    if abs(time.time() - signed.timestamp) > webhook.max_age:
        raise Unauthorized(
            f"the webhook was signed more than {webhook.max_age:g} seconds from now",
            code="stale_signature",
        )
    try:
        events = webhook.parse(body)
    except ValueError as exc:
        raise BadRequest(str(exc), code="invalid_webhook") from None
    confirm = None
    if webhook.subscription is not None:
        confirm = await webhook.subscription(body, headers, secret)
    columns, ignored = await _results(services, provider, account, events)
    seen = services.key(
        "webhook-seen", provider, hashlib.sha256(signed.signature.encode()).hexdigest()
    )
    if not await CLAIM_KEY(services.redis, (seen, int(2 * webhook.max_age))):
        if webhook.repeat_is_retry:
            return Received(0, duplicate=True)
        raise Unauthorized("this webhook post was already received", code="replayed_signature")
    try:
        if confirm is not None:
            await confirm_subscription(confirm)
        if columns:
            await PUBLISH_EVENTS(services, (provider, columns, hashlib.sha256(body).hexdigest()))
    except BaseException:
        await services.redis.delete(seen)  # not handed on: the provider may post it again
        raise
    _count(provider, columns)
    return Received(len(columns), ignored, subscribed=confirm is not None)


def _account_uuid(account_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(account_id)
    except ValueError:
        raise NotFound(
            "no such provider account with a webhook", code="account_not_found"
        ) from None


async def _account_secret(
    services: Services, account_id: uuid.UUID
) -> accounts.WebhookSecret | None:
    found = ACCOUNT_SECRETS.get(account_id)
    if found is _MISSING:
        sealer = accounts.Sealer(services.settings.credentials_keys)
        found = await accounts.webhook_secret(services.pool, sealer, account_id)
        ACCOUNT_SECRETS.put(account_id, found)
    return found


async def _results(
    services: Services, provider: str, account: uuid.UUID | None, events: list[WebhookEvent]
) -> tuple[Columns, int]:
    """The results rows of a post's events, and how many events are not handed on: the
    provider's ``sent``, and those about batches not sent through ``account`` (None: the
    default account) of ``provider``. ``BadRequest`` for a ref that is not ``batch:seq``."""
    names = [RESULT_EVENTS[event.event] for event in events]
    kept = [event for event, name in zip(events, names, strict=True) if name is not None]
    refs = [event.ref.partition(":") for event in kept]
    try:  # batch ids as given -> as uuid text (one parse each)
        canonical = {given: str(uuid.UUID(given)) for given in {ref[0] for ref in refs}}
        seqs = [int(ref[2]) for ref in refs]
    except ValueError:
        raise _unknown_ref(kept) from None
    statuses = [name for name in names if name is not None]
    columns = Columns(
        [canonical[ref[0]] for ref in refs],
        seqs,
        statuses,
        [event.provider_message_id for event in kept],
        [
            f"{provider}: {event.event}" if name == "dropped" else None
            for event, name in zip(kept, statuses, strict=True)
        ],
        [0] * len(kept),
        [0] * len(kept),
        [(event.email or "").rpartition("@")[2].lower() for event in kept],
    )
    owners = await _owners(services, set(canonical.values()))
    ours = (provider, account)
    foreign = {batch_id for batch_id, owner in owners.items() if owner != ours}
    ignored = len(events) - len(columns)
    if foreign:
        keep = [i for i, batch_id in enumerate(columns.batch_id) if batch_id not in foreign]
        ignored += len(columns) - len(keep)
        log.warning(
            "webhook events about batches not sent through this account ignored",
            extra={
                "provider": provider,
                "account_id": str(account),
                "events": len(columns) - len(keep),
            },
        )
        columns = columns.select(keep)
    return columns, ignored


async def _owners(
    services: Services, batch_ids: Iterable[str]
) -> dict[str, tuple[str, uuid.UUID | None] | None]:
    """(provider, account id) of each batch (``BATCH_OWNERS``, else one query for all the
    batches not known yet); None for a batch that does not exist."""
    owners: dict[str, tuple[str, uuid.UUID | None] | None] = {}
    unknown = []
    for batch_id in batch_ids:
        owner = BATCH_OWNERS.get(batch_id)
        if owner is _MISSING:
            unknown.append(batch_id)
        else:
            owners[batch_id] = owner
    if unknown:
        rows = await services.pool.fetch(
            "SELECT id, provider, provider_account_id FROM batches WHERE id = ANY($1::uuid[])",
            unknown,
        )
        found = {str(r["id"]): (r["provider"], r["provider_account_id"]) for r in rows}
        for batch_id in unknown:
            owners[batch_id] = found.get(batch_id)
            BATCH_OWNERS.put(batch_id, owners[batch_id])
    return owners


def _unknown_ref(events: list[WebhookEvent]) -> BadRequest:
    """The error naming the first of ``events`` whose ref is not ``batch:seq``."""
    for event in events:
        given, _, seq = event.ref.partition(":")
        try:
            uuid.UUID(given)
            int(seq)
        except ValueError:
            return BadRequest(
                f"event {event.event_id!r} has an unknown ref {event.ref!r}", code="invalid_webhook"
            )
    raise AssertionError("every ref is batch:seq")


def _count(provider: str, columns: Columns) -> None:
    for name, count in Counter(columns.status).items():
        metrics.WEBHOOKS.labels(provider, name).inc(count)


async def confirm_subscription(url: str) -> None:
    """GET a subscription's confirmation URL (one ``Webhook.subscription`` gave: the
    provider's own host); ``SubscriptionNotConfirmed`` unless it answers 200. Looked up
    in this module at each use, so a test can put its own in place (AWS is out of reach)."""
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=CONFIRM_TIMEOUT_SECONDS)
            ) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SubscriptionNotConfirmed(
            f"the subscription could not be confirmed: {type(exc).__name__}"
        ) from None
    if status != 200:
        raise SubscriptionNotConfirmed(f"the subscription could not be confirmed: HTTP {status}")
