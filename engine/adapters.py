"""Which providers this server can send through, their chunk sizes, and their adapters."""

from __future__ import annotations

from engine.config import Settings
from providers.base import Provider

# Every provider SPEC.md names, with the recipients one provider batch call takes.
CHUNK_SIZES: dict[str, int] = {
    "mock": 100,
    "smtp": 50,
    "ses": 50,
    "resend": 100,
    "postmark": 500,
    "sendgrid": 1000,
    "mailgun": 1000,
}
# The providers with an adapter in this build.
AVAILABLE = ("mock", "smtp")


def build_provider(name: str, settings: Settings) -> Provider:
    if name == "mock":
        from providers.mock import MockProvider

        return MockProvider(settings.mock_provider_url)
    if name == "smtp":
        from providers.smtp import SmtpProvider

        return SmtpProvider(
            settings.smtp_host,
            settings.smtp_port,
            username=settings.smtp_username or None,
            password=settings.smtp_password or None,
            start_tls=settings.smtp_tls,
        )
    raise KeyError(f"no adapter for provider {name!r}")
