"""The engine's exception hierarchy; the API maps each to the SPEC error body."""

from __future__ import annotations

from typing import Any


class BatchSenderError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, details: Any = None, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        if code:
            self.code = code


class ConfigError(BatchSenderError):
    code = "config_error"


class ValidationError(BatchSenderError):
    status = 422
    code = "validation_error"


class BadRequest(BatchSenderError):
    status = 400
    code = "bad_request"


class PayloadTooLarge(BatchSenderError):
    status = 413
    code = "payload_too_large"


class RequestTimeout(BatchSenderError):
    """The client did not send its request in time."""

    status = 408
    code = "request_timeout"


class Unauthorized(BatchSenderError):
    status = 401
    code = "unauthorized"


class NotFound(BatchSenderError):
    status = 404
    code = "not_found"


class Conflict(BatchSenderError):
    status = 409
    code = "conflict"


class Gone(BatchSenderError):
    """It existed and is no more (an expired link)."""

    status = 410
    code = "gone"


class UnsupportedMediaType(BatchSenderError):
    status = 415
    code = "unsupported_media_type"


class TooManyRequests(BatchSenderError):
    """A tenant limit; ``retry_after`` seconds is when trying again may succeed."""

    status = 429
    code = "too_many_requests"

    def __init__(
        self, message: str, details: Any = None, *, retry_after: int, code: str | None = None
    ):
        super().__init__(message, details, code=code)
        self.retry_after = retry_after
