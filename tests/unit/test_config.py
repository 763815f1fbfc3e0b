"""engine.config: defaults, .env files, validation of every kind of value, rates."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.config import Rate, load_settings, read_env_file
from engine.errors import ConfigError

REQUIRED = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/cfgtest",
    "NATS_URL": "nats://127.0.0.1:4222",
    "DRAGONFLY_URL": "redis://127.0.0.1:6379/0",
    "CLICKHOUSE_URL": "http://127.0.0.1:8123",
    "API_PORT": "6001",
    "WEB_PORT": "3000",
    # prod has no default secrets (a random one of 43 characters, as the README shows)
    "UNSUBSCRIBE_SECRET": "Vq3n8yQeM1xR0cJtZp5LwK7sHbA2dGfU9oNiE4lTjYr",
    "CREDENTIALS_KEYS": "pX7rT2mQ9wL4kZ8vB1nC6yH3jF5dS0aGeUoRiWtYqEz",
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder holding an empty ``.env.prod`` (found before the project's)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env.prod").write_text("")
    return tmp_path


def prod(**overrides: str) -> dict[str, str]:
    return {"BATCHSENDER_ENV": "prod", **REQUIRED, **overrides}


def config_error(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ)
    return str(caught.value)


def test_defaults(workdir: Path) -> None:
    settings = load_settings(prod())
    assert settings.env == "prod"
    assert settings.database_url == REQUIRED["DATABASE_URL"]
    assert settings.api_port == 6001 and settings.web_port == 3000
    assert settings.clickhouse_database == "batchsender"
    assert settings.nats_prefix == "batchsender" and settings.nats_replicas == 1
    assert load_settings({**prod(), "NATS_REPLICAS": "3"}).nats_replicas == 3
    assert settings.key_prefix == "bs:"
    assert settings.api_host == "127.0.0.1"
    assert settings.worker_processes == (os.cpu_count() or 1)
    assert settings.worker_concurrency == 32
    assert settings.send_max_attempts == 5
    assert settings.retry_base_seconds == 0.5
    assert settings.max_body_bytes == 64 << 20
    assert settings.max_recipients == 5_000_000
    assert settings.system_rate == Rate(1_000_000, 100_000)
    assert settings.provider_rates == {"mock": Rate(1_000_000, 100_000), "smtp": Rate(100, 100)}
    assert settings.smtp_tls is False
    assert settings.smtp_port == 1025
    assert settings.log_level == "INFO"


def test_environment_defaults_to_dev_and_unknown_environment_is_refused(workdir: Path) -> None:
    (workdir / ".env.dev").write_text("")
    assert load_settings(dict(REQUIRED)).env == "dev"
    message = config_error({**REQUIRED, "BATCHSENDER_ENV": "staging"})
    assert message.startswith("BATCHSENDER_ENV:")
    assert "staging" in message


def test_env_file_is_read_and_the_environment_wins(workdir: Path) -> None:
    (workdir / ".env.prod").write_text(
        "# a comment\n"
        "\n"
        "DATABASE_URL=postgresql://postgres@db.example:5432/fromfile\n"
        "NATS_URL = 'nats://nats.example:4222'\n"
        'DRAGONFLY_URL="redis://cache.example:6379/1"\n'
        "CLICKHOUSE_URL=http://ch.example:8123\n"
        "API_PORT=7001\n"
        "WEB_PORT=7000\n"
        "   # indented comment\n"
        "WORKER_CONCURRENCY=64\n"
        "SMTP_TLS=yes\n"
        f"UNSUBSCRIBE_SECRET={REQUIRED['UNSUBSCRIBE_SECRET']}\n"
        f"CREDENTIALS_KEYS={REQUIRED['CREDENTIALS_KEYS']}\n"
    )
    settings = load_settings({"BATCHSENDER_ENV": "prod", "API_PORT": "7002"})
    assert settings.database_url == "postgresql://postgres@db.example:5432/fromfile"
    assert settings.nats_url == "nats://nats.example:4222"  # spaces and quotes stripped
    assert settings.dragonfly_url == "redis://cache.example:6379/1"
    assert settings.api_port == 7002  # the process environment wins over the file
    assert settings.web_port == 7000
    assert settings.worker_concurrency == 64
    assert settings.smtp_tls is True


def test_env_file_line_without_equals_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / ".env.test"
    path.write_text("A=1\nthis line is wrong\n")
    with pytest.raises(ConfigError) as caught:
        read_env_file(path)
    assert str(caught.value).startswith(".env.test:2:")


def test_read_env_file_values(tmp_path: Path) -> None:
    path = tmp_path / ".env.x"
    path.write_text("A=1\n#B=2\nC='x=y'\nD=\n")
    assert read_env_file(path) == {"A": "1", "C": "x=y", "D": ""}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_missing_required_variable_is_named(workdir: Path, name: str) -> None:
    environ = prod()
    del environ[name]
    message = config_error(environ)
    assert message.startswith(f"{name}: missing")
    assert ".env.prod" in message


def test_empty_required_variable_counts_as_missing(workdir: Path) -> None:
    assert config_error(prod(NATS_URL="")).startswith("NATS_URL: missing")


def test_empty_optional_variable_takes_the_default(workdir: Path) -> None:
    assert load_settings(prod(WORKER_CONCURRENCY="")).worker_concurrency == 32


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # URLs: wrong scheme, no host, bad port
        ("DATABASE_URL", "mysql://127.0.0.1/db"),
        ("DATABASE_URL", "postgresql:///only-a-path"),
        ("NATS_URL", "http://127.0.0.1:4222"),
        ("DRAGONFLY_URL", "127.0.0.1:6379"),
        ("CLICKHOUSE_URL", "ftp://127.0.0.1"),
        ("CLICKHOUSE_URL", "http://127.0.0.1:99999"),
        ("MOCK_PROVIDER_URL", "localhost"),
        # integers: not a number, out of range
        ("API_PORT", "http"),
        ("API_PORT", "0"),
        ("WEB_PORT", "65536"),
        ("WORKER_PROCESSES", "2.5"),
        ("MAX_BODY_BYTES", "100"),
        # floats: not a number, out of range, not a number at all
        ("DRAIN_TIMEOUT", "soon"),
        ("WORKER_HEARTBEAT_TIMEOUT", "0.5"),
        ("CLICKHOUSE_FLUSH_SECONDS", "nan"),
        # booleans
        ("SMTP_TLS", "maybe"),
        # rates
        ("SYSTEM_RATE", "fast"),
        ("SYSTEM_RATE", "0/10"),
        ("TENANT_RATE", "10/0"),
        ("TENANT_RATE", "-5/5"),
        ("TENANT_RATE", "10/2.5"),
        ("SYSTEM_RATE", "nan/10"),
        ("SYSTEM_RATE", "inf/10"),
        ("PROVIDER_RATES", "mock"),
        ("PROVIDER_RATES", "=10/10"),
        ("PROVIDER_RATES", "mock=10/10,smtp=x"),
        # identifiers
        ("NATS_PREFIX", "bad-prefix"),
        ("CLICKHOUSE_DATABASE", "db; DROP TABLE x"),
        # choices
        ("LOG_LEVEL", "TRACE"),
        ("LOG_LEVEL", "info"),
    ],
)
def test_bad_value_names_the_variable(workdir: Path, name: str, value: str) -> None:
    message = config_error(prod(**{name: value}))
    assert message.startswith(f"{name}: ")
    assert "missing" not in message
    assert repr(value) in message  # the offending value is shown


def test_first_bad_variable_is_reported_alone(workdir: Path) -> None:
    message = config_error(prod(API_PORT="x", LOG_LEVEL="TRACE"))
    assert message.startswith("API_PORT: ")
    assert "LOG_LEVEL" not in message


def test_valid_boundaries_are_accepted(workdir: Path) -> None:
    settings = load_settings(
        prod(API_PORT="65535", WEB_PORT="1", SMTP_TLS="OFF", LOG_LEVEL="DEBUG",
             NATS_PREFIX="a_b_9", DATABASE_URL="postgres://u:p@h:1/d")
    )  # fmt: skip
    assert (settings.api_port, settings.web_port) == (65535, 1)
    assert settings.smtp_tls is False
    assert settings.log_level == "DEBUG"
    assert settings.nats_prefix == "a_b_9"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("50/10", Rate(50, 10)),
        ("2.5/3", Rate(2.5, 3)),
        ("100", Rate(100, 100)),  # burst defaults to one second's worth
        ("0.5", Rate(0.5, 1)),  # ... and at least 1
    ],
)
def test_rate_parsing(workdir: Path, value: str, expected: Rate) -> None:
    assert load_settings(prod(SYSTEM_RATE=value)).system_rate == expected


def test_provider_rates_parsing_and_fallback(workdir: Path) -> None:
    settings = load_settings(
        prod(PROVIDER_RATES=" mock = 50000/5000 , smtp=14,,", SYSTEM_RATE="7/3")
    )
    assert settings.provider_rates == {"mock": Rate(50000, 5000), "smtp": Rate(14, 14)}
    assert settings.provider_rate("smtp") == Rate(14, 14)
    assert settings.provider_rate("ses") == Rate(7, 3)  # no own rate: the system rate


def test_empty_provider_rates_means_no_provider_limits(workdir: Path) -> None:
    settings = load_settings(prod(PROVIDER_RATES=","))
    assert settings.provider_rates == {}


def test_as_environ_round_trips(workdir: Path) -> None:
    settings = load_settings(
        prod(PROVIDER_RATES="mock=1234567/100,smtp=0.25/1", TENANT_RATE="333333.5/7",
             SMTP_TLS="true", SMTP_PASSWORD="p@ss", WORKER_PROCESSES="3")
    )  # fmt: skip
    environ = settings.as_environ()
    assert environ["BATCHSENDER_ENV"] == "prod"
    assert environ["SMTP_TLS"] == "true"
    assert load_settings(environ) == settings


# --- secrets and the mock provider in prod ------------------------------------------------

STRONG = "x7Qm2RkP9vTzLc4WnJ8bYh3FsGd6AeU1oKiN5rXqBtM"


def test_prod_has_no_default_unsubscribe_secret(workdir: Path) -> None:
    environ = prod()
    del environ["UNSUBSCRIBE_SECRET"]
    assert config_error(environ).startswith("UNSUBSCRIBE_SECRET: missing")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("dev-unsubscribe-secret", "committed development value"),  # the committed default
        ("mock-secret", "committed development value"),
        ("CHANGE_ME_LONG_RANDOM", "placeholder"),  # .env.prod.example's placeholder
        ("s3cret-but-short", "at least 32 characters"),
        ("a" * 64, "distinct characters"),
        ("abababababababababababababababababab", "distinct characters"),
    ],
)
def test_prod_refuses_a_default_placeholder_or_weak_secret(
    workdir: Path, value: str, why: str
) -> None:
    message = config_error(prod(UNSUBSCRIBE_SECRET=value))
    assert message.startswith("UNSUBSCRIBE_SECRET: ") and why in message
    assert value not in message and "\n" not in message  # one line, the secret not shown


def test_prod_holds_every_credentials_key_to_the_secret_rules(workdir: Path) -> None:
    good = REQUIRED["CREDENTIALS_KEYS"]
    assert load_settings(prod(CREDENTIALS_KEYS=f"{good[::-1]},{good}")).credentials_keys == (
        good[::-1],
        good,
    )
    message = config_error(prod(CREDENTIALS_KEYS=f"{good},short-old-key"))
    assert message.startswith("CREDENTIALS_KEYS: too short") and "short-old-key" not in message
    assert config_error(prod(CREDENTIALS_KEYS=f"{good},")).startswith("CREDENTIALS_KEYS: ")


def test_dev_and_test_keep_their_committed_secrets(workdir: Path) -> None:
    for env in ("dev", "test"):
        (workdir / f".env.{env}").write_text("")
        settings = load_settings({**REQUIRED, "BATCHSENDER_ENV": env, "UNSUBSCRIBE_SECRET": ""})
        assert settings.unsubscribe_secret == "dev-unsubscribe-secret"
        assert settings.mock_webhook_secret == "mock-secret"
        assert settings.mock_provider_enabled and settings.provider_enabled("mock")


def test_prod_mock_provider_is_off_by_default_and_needs_a_real_secret_when_on(
    workdir: Path,
) -> None:
    settings = load_settings(prod())
    assert settings.mock_provider_enabled is False
    assert not settings.provider_enabled("mock") and settings.provider_enabled("smtp")
    assert settings.mock_webhook_secret == ""  # not in use, so not asked for
    assert config_error(prod(MOCK_PROVIDER_ENABLED="true")).startswith(
        "MOCK_WEBHOOK_SECRET: missing"
    )
    message = config_error(prod(MOCK_PROVIDER_ENABLED="true", MOCK_WEBHOOK_SECRET="mock-secret"))
    assert message.startswith("MOCK_WEBHOOK_SECRET: ") and "committed development value" in message
    on = load_settings(prod(MOCK_PROVIDER_ENABLED="true", MOCK_WEBHOOK_SECRET=STRONG))
    assert on.provider_enabled("mock") and on.mock_webhook_secret == STRONG


def test_prod_refuses_any_placeholder_left_from_the_example(workdir: Path) -> None:
    url = "postgresql://batchsender:CHANGE_ME@postgres:5432/batchsender"
    message = config_error(prod(DATABASE_URL=url))
    assert message.startswith("DATABASE_URL: ") and "CHANGE_ME" in message


def test_the_committed_prod_example_does_not_start_as_it_is(workdir: Path) -> None:
    example = Path(__file__).resolve().parents[2] / ".env.prod.example"
    (workdir / ".env.prod").write_text(example.read_text())
    assert "placeholder" in config_error({"BATCHSENDER_ENV": "prod"})


def test_auth_settings(workdir: Path) -> None:
    settings = load_settings(prod())
    assert (settings.auth_failure_limit, settings.auth_failure_window_seconds) == (20, 60)
    assert settings.trusted_proxies == ()
    settings = load_settings(prod(TRUSTED_PROXIES="10.0.0.0/8, 192.168.1.7,fd00::/8"))
    assert [str(n) for n in settings.trusted_proxies] == [
        "10.0.0.0/8",
        "192.168.1.7/32",
        "fd00::/8",
    ]
    assert load_settings(settings.as_environ()) == settings
    for name, value in (("TRUSTED_PROXIES", "10.0.0.0/8,not-an-address"),
                        ("AUTH_FAILURE_LIMIT", "0"), ("AUTH_FAILURE_WINDOW_SECONDS", "0")):  # fmt: skip
        assert config_error(prod(**{name: value})).startswith(f"{name}: ")
