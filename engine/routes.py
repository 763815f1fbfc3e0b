"""Where a batch's messages go: its provider adapter, the rate it is paced at, and the
daily quota it counts against.

A batch names a tenant's provider account (``batches.provider_account_id``) or none: then
it goes through the server's default account of its provider (the environment's mock or
SMTP settings, one adapter per worker process, paced by ``PROVIDER_RATES``). An account's
route is its own adapter (built by ``ProviderSpec.for_account`` from the opened
credentials), its own token bucket ``rl:account:<id>`` (so its rate holds across every
worker and pod) and its daily quota, counted in ``quota:<id>:<UTC day>``. When the provider
throttles a call and says how long to wait (``Retry-After``, SendGrid's and Resend's
rate-limit reset headers), the account's bucket gives no token for that long
(``TokenBuckets.hold``): every worker and pod waits, not only the one told.

Account routes are built on first use and kept ``TTL`` seconds, then the account is read
again: a deleted account stops being used within that time (its batches' chunks then fail
with the reason). The last ``SIZE`` accounts used are kept; an adapter dropped from the
cache is closed after ``CLOSE_AFTER`` seconds, when no call can still be using it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from engine import accounts
from engine.accounts import Sealer, Sending
from engine.config import Rate
from engine.services import Services
from providers.base import Message, Provider, SendResult
from providers.registry import PROVIDERS

log = logging.getLogger(__name__)

TTL = 30.0  # seconds an account's route is used before the account is read again
SIZE = 256  # account routes kept per worker process
CLOSE_AFTER = 120.0  # seconds before a replaced adapter is closed (longer than any call)


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    rate: Rate
    bucket: str  # the token bucket's key
    daily_quota: int | None = None
    quota_key: str | None = None  # the quota counter's key, without the day
    # Whether the provider's "retry after N s" on a throttled call holds the whole bucket
    # (a real provider's account limit). Not for the default routes: the mock's 429s are
    # faults injected per request, not a limit.
    adapts: bool = False
    calls: asyncio.Semaphore | None = None  # ProviderSpec.max_in_flight, in this process

    async def send(self, messages: list[Message]) -> tuple[list[SendResult], float]:
        """One provider call (after a free place among ``calls``): the answers, and the
        seconds the call itself took."""
        if self.calls is None:
            return await _timed(self.provider, messages)
        async with self.calls:
            return await _timed(self.provider, messages)


async def _timed(provider: Provider, messages: list[Message]) -> tuple[list[SendResult], float]:
    started = time.perf_counter()
    answers = await provider.send(messages)
    return answers, time.perf_counter() - started


def _calls(provider: str) -> asyncio.Semaphore | None:
    limit = PROVIDERS[provider].max_in_flight
    return asyncio.Semaphore(limit) if limit else None


@dataclass(slots=True)
class _Cached:
    route: Route
    sending: Sending
    loaded_at: float


class Routes:
    """Routes by batch: the default ones (``defaults``: adapters by provider name) and the
    tenants' accounts."""

    def __init__(self, services: Services, defaults: dict[str, Provider]) -> None:
        self.services = services
        settings = services.settings
        self._defaults = {
            name: Route(
                adapter,
                settings.provider_rate(name),
                services.key("rl", "provider", name),
                calls=_calls(name),
            )
            for name, adapter in defaults.items()
        }
        self._sealer: Sealer | None = None
        self._accounts: OrderedDict[str, _Cached] = OrderedDict()
        self._closing: dict[asyncio.Task[None], Provider] = {}

    def default(self, provider: str) -> Route:
        """The server's default account of ``provider``; ``KeyError`` when this process has
        none (its settings do not enable it)."""
        return self._defaults[provider]

    async def account(self, account_id: str) -> Route | None:
        """The route of a provider account; None when the account no longer exists.
        ``ValueError`` when it cannot be built (credentials sealed under none of the keys,
        an account the adapter refuses)."""
        cached = self._accounts.get(account_id)
        now = time.monotonic()
        if cached is not None and now - cached.loaded_at < TTL:
            self._accounts.move_to_end(account_id)
            return cached.route
        sending = await accounts.sending(
            self.services.pool,
            self._get_sealer(),
            account_id,
            allow_private=self.services.settings.provider_allow_private_urls,
        )
        if sending is None:
            self._drop(account_id)
            return None
        if cached is not None and cached.sending == sending:
            cached.loaded_at = now
            return cached.route
        self._drop(account_id)
        build = PROVIDERS[sending.account.provider].for_account
        if build is None:
            raise ValueError(f"{sending.account.provider} has no provider accounts")
        key = self.services.key
        route = Route(
            build(sending.account),
            sending.rate,
            key("rl", "account", account_id),
            sending.daily_quota,
            key("quota", account_id),
            adapts=True,
            calls=_calls(sending.account.provider),
        )
        self._accounts[account_id] = _Cached(route, sending, now)
        while len(self._accounts) > SIZE:
            self._drop(next(iter(self._accounts)))
        return route

    def _get_sealer(self) -> Sealer:
        if self._sealer is None:
            self._sealer = Sealer(self.services.settings.credentials_keys)
        return self._sealer

    def _drop(self, account_id: str) -> None:
        cached = self._accounts.pop(account_id, None)
        if cached is not None:
            task = asyncio.create_task(self._close_later(cached.route.provider))
            self._closing[task] = cached.route.provider
            task.add_done_callback(lambda done: self._closing.pop(done, None))

    async def _close_later(self, provider: Provider) -> None:
        await asyncio.sleep(CLOSE_AFTER)
        with contextlib.suppress(Exception):
            await provider.close()

    async def close(self) -> None:
        """Close every adapter (the default ones are their owner's to close)."""
        retired = list(self._closing.items())
        self._closing.clear()
        for task, _ in retired:
            task.cancel()
        adapters = [provider for _, provider in retired]
        adapters += [cached.route.provider for cached in self._accounts.values()]
        self._accounts.clear()
        for provider in adapters:
            with contextlib.suppress(Exception):
                await provider.close()
