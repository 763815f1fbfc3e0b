"""What the provider adapter tests share: a closed loopback port, closing an adapter after
use, the checks that results leak no address or secret and that a fake delivered every
message exactly once, and what engine.webhooks.receive does with a verified post."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

from engine.webhooks import TOLERANCE_SECONDS
from providers.base import Message, SendResult, Signed


class _Closable(Protocol):
    async def close(self) -> None: ...


P = TypeVar("P", bound=_Closable)
D = TypeVar("D")


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def closing(provider: P) -> AsyncIterator[P]:
    """``provider`` while inside, closed after."""
    try:
        yield provider
    finally:
        await provider.close()


def assert_no_secrets(
    results: Iterable[SendResult], *secrets: str, pause_reason: bool = False
) -> None:
    """No result's error (and, with ``pause_reason``, pause reason) names an address or
    one of ``secrets``."""
    for result in results:
        texts = [result.error or ""] + ([result.pause_reason or ""] if pause_reason else [])
        for text in texts:
            assert "@" not in text, text
            for secret in secrets:
                assert secret not in text, text


def assert_delivered_exactly(
    delivered: Iterable[D],
    messages: list[Message],
    results: list[SendResult],
    ref_of: Callable[[D], str],
    check: Callable[[Message, SendResult, D], None],
) -> None:
    """Every accepted message reached its recipient once: ``delivered`` holds one record
    per ref (``ref_of``), each as ``check`` expects for its message and result."""
    by_ref: dict[str, D] = {}
    for record in delivered:
        ref = ref_of(record)
        assert ref not in by_ref, f"{ref} was delivered twice"
        by_ref[ref] = record
    assert [r.ref for r in results] == [m.ref for m in messages]
    for message, result in zip(messages, results, strict=True):
        assert result.ok, result.error
        check(message, result, by_ref[message.ref])
    assert len(by_ref) == len(messages)


class ReplayGuard:
    """What engine.webhooks.receive does with a verified post: refuse it when its
    timestamp is out of tolerance, and when its replay key (its signature) was seen
    before."""

    def __init__(self, tolerance: float = TOLERANCE_SECONDS) -> None:
        self.tolerance = tolerance
        self.seen: set[str] = set()

    def judge(self, signed: Signed | None) -> str:
        if signed is None:
            return "bad_signature"
        if abs(time.time() - signed.timestamp) > self.tolerance:
            return "stale_signature"
        if signed.signature in self.seen:
            return "replayed_signature"
        self.seen.add(signed.signature)
        return "accepted"
