"""providers.registry: every provider is known through its spec, and only there."""

from __future__ import annotations

import ast
import dataclasses
import types
from pathlib import Path
from typing import get_type_hints

import pytest

from engine import webhooks
from engine.config import Settings
from engine.errors import NotFound
from providers.base import Account
from providers.registry import AVAILABLE, KNOWN, PROVIDERS, WEBHOOKS

PROVIDERS_DIR = Path(__file__).resolve().parents[2] / "providers"


def test_every_available_provider_is_known_and_named_by_its_spec() -> None:
    assert set(AVAILABLE) <= set(KNOWN)
    assert list(PROVIDERS) == list(AVAILABLE)
    assert all(spec.name == name for name, spec in PROVIDERS.items())


# An account each provider's adapter accepts (nothing is sent).
ACCOUNTS = {
    "smtp": Account("smtp", {"username": "u", "password": "p"}, "smtp://127.0.0.1:2525"),
    "ses": Account("ses", {"access_key_id": "AKIDEXAMPLE", "secret_access_key": "s"}, None, "eu-west-1"),
    "sendgrid": Account("sendgrid", {"api_key": "SG.x"}),
    "mailgun": Account("mailgun", {"api_key": "key-x"}, domain="mg.example.com"),
    "postmark": Account("postmark", {"server_token": "t"}),
    "resend": Account("resend", {"api_key": "re_x"}),
}  # fmt: skip
DEFAULTS = ("mock", "smtp")  # the providers with a default account in the environment


@pytest.mark.parametrize("name", DEFAULTS)
def test_the_default_adapter_takes_the_chunk_size_intake_uses(
    name: str, settings: Settings
) -> None:
    spec = PROVIDERS[name]
    adapter = spec.build(settings)
    assert adapter.name == name
    assert adapter.max_per_call == spec.max_per_call > 0


@pytest.mark.parametrize("name", list(ACCOUNTS))
def test_an_account_adapter_takes_the_chunk_size_intake_uses(name: str) -> None:
    spec = PROVIDERS[name]
    assert spec.for_account is not None
    adapter = spec.for_account(ACCOUNTS[name])
    assert adapter.name == name
    assert adapter.max_per_call == spec.max_per_call > 0


@pytest.mark.parametrize("name", [n for n in AVAILABLE if n not in DEFAULTS])
def test_a_provider_without_a_default_account_is_not_enabled(name: str, settings: Settings) -> None:
    assert not settings.provider_enabled(name)
    assert PROVIDERS[name].for_account is not None


@pytest.mark.parametrize("name", DEFAULTS)
def test_the_settings_a_spec_reads_are_settings_fields(name: str) -> None:
    needed = set(get_type_hints(PROVIDERS[name].settings))
    assert needed and needed <= {f.name for f in dataclasses.fields(Settings)}


def test_the_mock_is_enabled_by_its_setting(settings: Settings) -> None:
    off = dataclasses.replace(settings, mock_provider_enabled=False)
    assert settings.provider_enabled("mock") and not off.provider_enabled("mock")
    assert off.provider_enabled("smtp")
    assert not settings.provider_enabled("ses") and not settings.provider_enabled("pigeon")


async def test_a_provider_without_a_webhook_has_no_route(settings: Settings) -> None:
    assert PROVIDERS["smtp"].webhook is None and "smtp" not in WEBHOOKS
    assert set(WEBHOOKS) == set(KNOWN) - {"smtp"}
    services = types.SimpleNamespace(settings=settings)  # refused before any service is used
    with pytest.raises(NotFound):
        await webhooks.receive(services, "smtp", b"[]", {})


def test_providers_import_nothing_of_the_engine_or_the_api() -> None:
    for path in PROVIDERS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in ("engine", "api"), f"{path.name}: {module}"
