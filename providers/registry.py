"""The providers this server knows: the one place the engine and the API look them up.

Adding a provider is a module ``providers/<name>.py`` with a ``SPEC`` and its name in
``AVAILABLE``.
"""

from __future__ import annotations

from importlib import import_module

from providers.base import ProviderSpec, Webhook

# Every provider SPEC.md names, in the order intake lists them.
KNOWN = ("mock", "smtp", "ses", "resend", "postmark", "sendgrid", "mailgun")
# Those with a module here: all of them. mock and smtp have a default account in the
# environment (their settings); every provider but mock is reached through a tenant's
# provider account (``ProviderSpec.for_account``).
AVAILABLE = KNOWN

PROVIDERS: dict[str, ProviderSpec] = {
    name: import_module(f"providers.{name}").SPEC for name in AVAILABLE
}
# The credentials a provider account holds, per provider (every one required; all sealed
# at rest by engine.accounts). The adapters read them from ``providers.base.Account``.
CREDENTIALS: dict[str, tuple[str, ...]] = {
    "smtp": ("username", "password"),
    "ses": ("access_key_id", "secret_access_key"),
    "sendgrid": ("api_key",),
    "mailgun": ("api_key",),
    "postmark": ("server_token",),
    "resend": ("api_key",),
}
# The providers with a webhook route.
WEBHOOKS: dict[str, Webhook] = {
    name: spec.webhook for name, spec in PROVIDERS.items() if spec.webhook is not None
}
