"""What every provider adapter offers the engine.

A provider takes a list of already-personalised messages (one chunk) and answers one
result per message, in the same order. Errors are classified here, by the adapter that
understands the provider: ``retryable`` (timeouts, connection errors, 429, 5xx) or not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class Message:
    """One personalised e-mail. ``ref`` is the engine's id of the recipient ("batch:seq")."""

    ref: str
    to_email: str
    to_name: str | None
    from_email: str
    from_name: str | None
    subject: str
    html: str | None
    text: str | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class SendResult:
    """The provider's answer for one message."""

    ref: str
    ok: bool
    provider_message_id: str | None = None
    error: str | None = None
    retryable: bool = False
    retry_after: float | None = None


class Provider(Protocol):
    """A provider adapter. ``max_batch`` is how many messages one ``send_batch`` call takes."""

    name: str
    max_batch: int

    async def send_batch(self, messages: list[Message]) -> list[SendResult]: ...

    async def close(self) -> None: ...


class ProviderError(Exception):
    """A whole call failed (connection refused, timeout, 5xx for the request)."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


def failed_all(messages: list[Message], error: ProviderError) -> list[SendResult]:
    """Every message of a call that failed as a whole gets the call's error."""
    return [
        SendResult(m.ref, False, None, str(error), error.retryable, error.retry_after)
        for m in messages
    ]
