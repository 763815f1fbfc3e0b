"""The one typed settings object, built once from the environment and validated.

Values come from the process environment, over the file ``.env.<BATCHSENDER_ENV>``
(dev, test or prod; found in the working directory or the project root). Nothing else in
the project reads ``os.environ``. A bad or missing value raises ``ConfigError`` naming the
variable; the CLI prints that one line and exits.

Secrets have a committed development value outside prod only. In prod every secret in use
must be set, must not be a committed value or a placeholder of ``.env.prod.example``
(``CHANGE_ME`` anywhere in any variable stops the start), and must be at least
``MIN_SECRET_LENGTH`` characters with ``MIN_SECRET_DISTINCT`` different ones. The mock
provider (its webhook route and its place at intake) is off in prod unless
``MOCK_PROVIDER_ENABLED`` is set.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.errors import ConfigError

ENVIRONMENTS = ("dev", "test", "prod")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = "CHANGE_ME"  # what .env.prod.example holds where a real value must go
MIN_SECRET_LENGTH = 32
MIN_SECRET_DISTINCT = 10
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Rate:
    """A token-bucket rate: ``per_second`` messages per second, up to ``burst`` at once."""

    per_second: float
    burst: int


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"must be a {'/'.join(s + '://' for s in schemes)} URL")
        return value

    return parse


def _int(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number

    return parse


def _float(low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = float(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high}")
        return number

    return parse


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def parse_rate(value: str) -> Rate:
    """``'<per_second>/<burst>'`` (burst defaults to one second's worth)."""
    per_second, _, burst = value.partition("/")
    rate = Rate(float(per_second), int(burst or max(1, int(float(per_second)))))
    if not 0 < rate.per_second < math.inf or rate.burst < 1:
        raise ValueError("must be '<per_second>/<burst>' with both positive")
    return rate


def _rates(value: str) -> dict[str, Rate]:
    result: dict[str, Rate] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ValueError("must be 'provider=<per_second>/<burst>,...'")
        result[name.strip()] = parse_rate(spec)
    return result


def _identifier(value: str) -> str:
    if not value or not value.replace("_", "").isalnum():
        raise ValueError("must be letters, digits and underscores")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _text(value: str) -> str:
    return value


def _networks(value: str) -> tuple[Network, ...]:
    try:
        return tuple(
            ipaddress.ip_network(part.strip(), strict=False)
            for part in value.split(",")
            if part.strip()
        )
    except ValueError:
        raise ValueError("must be IP addresses or networks (CIDR), comma-separated") from None


def _keys(value: str) -> tuple[str, ...]:
    keys = tuple(part.strip() for part in value.split(","))
    if not all(keys):
        raise ValueError("must be one or more secrets, comma-separated, none empty")
    return keys


@dataclass(frozen=True, slots=True)
class _Secret:
    """A secret setting: its committed development value, and when prod needs it."""

    dev_value: str
    in_use: Callable[[dict[str, Any]], bool] = lambda _values: True
    listed: bool = False  # comma-separated secrets, each held to the rules

    def default(self, values: dict[str, Any]) -> str | None:
        """Outside prod the development value; in prod none (missing) when in use."""
        if values["env"] != "prod":
            return self.dev_value
        return None if self.in_use(values) else ""


_SECRETS: dict[str, _Secret] = {
    "MOCK_WEBHOOK_SECRET": _Secret("mock-secret", lambda values: values["mock_provider_enabled"]),
    "UNSUBSCRIBE_SECRET": _Secret("dev-unsubscribe-secret"),
    "CREDENTIALS_KEYS": _Secret("dev-credentials-key", listed=True),
}


def _check_prod_value(name: str, raw: str, values: dict[str, Any]) -> None:
    """What prod refuses beyond the parser: placeholders, and weak or committed secrets."""
    if PLACEHOLDER in raw:
        raise ConfigError(
            f"{name}: still holds the placeholder {PLACEHOLDER} of .env.prod.example; "
            "set the real value"
        )
    secret = _SECRETS.get(name)
    if secret is None or not secret.in_use(values):
        return
    hint = "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    for part in raw.split(",") if secret.listed else (raw,):
        part = part.strip()
        if any(part == s.dev_value for s in _SECRETS.values()):
            raise ConfigError(f"{name}: is a committed development value, refused in prod; {hint}")
        if len(part) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"{name}: too short for prod (at least {MIN_SECRET_LENGTH} characters); {hint}"
            )
        if len(set(part)) < MIN_SECRET_DISTINCT:
            raise ConfigError(
                f"{name}: too weak for prod (fewer than {MIN_SECRET_DISTINCT} distinct "
                f"characters); {hint}"
            )


def _cpus(_values: dict[str, Any]) -> str:
    return str(os.cpu_count() or 1)


def _local_api(values: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{values['api_port']}"


def _not_in_prod(values: dict[str, Any]) -> str:
    return "false" if values["env"] == "prod" else "true"


def _optional_url(*schemes: str) -> Callable[[str], str]:
    """A URL of ``schemes``, or ``off`` (stored as ''): a service the deployment may lack."""
    parse = _url(*schemes)

    def optional(value: str) -> str:
        return "" if value.strip().lower() == "off" else parse(value).rstrip("/")

    return optional


def _in_dev(value: str) -> Callable[[dict[str, Any]], str]:
    """``value`` in dev (what ./setup-dev.sh starts there), else off."""
    return lambda values: value if values["env"] == "dev" else "off"


# name -> (parser, default or None when required). Defaults that depend on the machine or
# on variables above them are callables of the values parsed so far (None: required).
_Default = str | Callable[[dict[str, Any]], str | None] | None
_SCHEMA: dict[str, tuple[Callable[[str], Any], _Default]] = {
    "DATABASE_URL": (_url("postgres", "postgresql"), None),
    "NATS_URL": (_url("nats", "tls"), None),
    "DRAGONFLY_URL": (_url("redis", "rediss"), None),
    "CLICKHOUSE_URL": (_url("http", "https"), None),
    "CLICKHOUSE_DATABASE": (_identifier, "batchsender"),
    "API_HOST": (_text, "127.0.0.1"),
    "API_PORT": (_int(1, 65535), None),
    "WEB_PORT": (_int(1, 65535), None),
    # The web dashboard (web/, ``batchsender web``): where it listens, how long a session
    # lasts at most and without a request; Prometheus and Grafana for its Performance page
    # ('off': not shown; dev defaults to the ones ./setup-dev.sh starts).
    "WEB_HOST": (_text, "127.0.0.1"),
    "WEB_SESSION_SECONDS": (_int(60, 30 * 86400), str(12 * 3600)),
    "WEB_IDLE_SECONDS": (_int(60, 30 * 86400), str(3600)),
    "PROMETHEUS_URL": (_optional_url("http", "https"), _in_dev("http://127.0.0.1:9090")),
    "GRAFANA_URL": (_optional_url("http", "https"), _in_dev("http://127.0.0.1:3003")),
    "NATS_PREFIX": (_identifier, "batchsender"),
    # Copies of every stream on a NATS cluster (JetStream's num_replicas: 3 on a 3-server
    # cluster survives one server lost; 1 on a single server).
    "NATS_REPLICAS": (_int(1, 5), "1"),
    "KEY_PREFIX": (_text, "bs:"),
    "METRICS_DIR": (_text, "/tmp/batchsender-metrics"),
    # 0: off. Where the workers run apart from the API (a pod, a container), their own
    # metrics endpoint (engine.metrics.serve), bound to API_HOST.
    "WORKER_METRICS_PORT": (_int(0, 65535), "0"),
    "WORKER_PROCESSES": (_int(1, 256), _cpus),
    "WORKER_CONCURRENCY": (_int(1, 4096), "32"),
    "WORKER_HEARTBEAT_TIMEOUT": (_float(1, 3600), "30"),
    "DRAIN_TIMEOUT": (_float(1, 3600), "30"),
    "SYSTEM_RATE": (parse_rate, "1000000/100000"),
    "TENANT_RATE": (parse_rate, "1000000/100000"),
    "PROVIDER_RATES": (_rates, "mock=1000000/100000,smtp=100/100"),
    "SEND_MAX_ATTEMPTS": (_int(1, 50), "5"),
    "RETRY_BASE_SECONDS": (_float(0.01, 600), "0.5"),
    "MAX_BODY_BYTES": (_int(1024, 1 << 40), str(64 << 20)),
    "MAX_RECIPIENTS": (_int(1, 100_000_000), "5000000"),
    "MAX_UPLOAD_BYTES": (_int(1024, 1 << 44), str(4 << 30)),  # one streamed CSV/NDJSON body
    "UPLOAD_DIR": (_text, ""),  # where uploads past 8 MiB are spooled ('': the system's)
    "TENANT_MAX_UPLOADS": (_int(1, 100_000), "4"),  # creates/appends in progress at once
    "BODY_TIMEOUT_SECONDS": (_float(0.1, 3600), "20"),  # longest wait for a body's next bytes
    "BODY_MIN_RATE": (_int(0, 1 << 30), "16384"),  # bytes/s on average, after that long
    "TENANT_MAX_ACTIVE_BATCHES": (_int(1, 1_000_000), "1000"),
    "STALL_SECONDS": (_float(5, 86400), "60"),
    # Events per ClickHouse insert, at most, and seconds the first waits: fewer, larger
    # parts cost ClickHouse ~40 % less CPU per event than 25,000 and 1 s; a worker's peak
    # memory with them is in bench/RESULTS.md (2026-12-04).
    "CLICKHOUSE_FLUSH_ROWS": (_int(1, 10_000_000), "50000"),
    "CLICKHOUSE_FLUSH_SECONDS": (_float(0.05, 600), "2"),
    # Read by providers/mock.py (MockSettings)
    "MOCK_PROVIDER_ENABLED": (_bool, _not_in_prod),  # its webhook route and intake
    "MOCK_PROVIDER_URL": (_url("http", "https"), "http://127.0.0.1:6100"),
    "MOCK_WEBHOOK_SECRET": (_text, _SECRETS["MOCK_WEBHOOK_SECRET"].default),
    "PUBLIC_URL": (_url("http", "https"), _local_api),  # where recipients reach the API
    "UNSUBSCRIBE_SECRET": (_text, _SECRETS["UNSUBSCRIBE_SECRET"].default),
    # Seal provider accounts' credentials (engine.accounts): comma-separated, the first seals.
    "CREDENTIALS_KEYS": (_keys, _SECRETS["CREDENTIALS_KEYS"].default),
    # Customers' event webhooks (engine.webhook_endpoints) may target plain http and
    # loopback, private or link-local addresses: for development only (SSRF otherwise).
    "WEBHOOK_ALLOW_PRIVATE_URLS": (_bool, _not_in_prod),
    # Provider accounts' base URLs may be plain http and loopback, private or link-local
    # addresses (engine.outbound): development servers, or a provider that is an internal
    # relay of the deployment.
    "PROVIDER_ALLOW_PRIVATE_URLS": (_bool, _not_in_prod),
    "AUTH_FAILURE_LIMIT": (_int(1, 1_000_000), "20"),  # failed keys per client address ...
    "AUTH_FAILURE_WINDOW_SECONDS": (_int(1, 86400), "60"),  # ... in this window, then 429
    "TRUSTED_PROXIES": (_networks, ""),  # whose X-Forwarded-For names the client
    # Read by providers/smtp.py (SmtpSettings)
    "SMTP_HOST": (_text, "127.0.0.1"),
    "SMTP_PORT": (_int(1, 65535), "1025"),
    "SMTP_USERNAME": (_text, ""),
    "SMTP_PASSWORD": (_text, ""),
    "SMTP_TLS": (_bool, "false"),
    "LOG_LEVEL": (_choice("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
}


_OFF_WHEN_EMPTY = frozenset({"PROMETHEUS_URL", "GRAFANA_URL"})


@dataclass(frozen=True, slots=True)
class Settings:
    env: str
    database_url: str
    nats_url: str
    dragonfly_url: str
    clickhouse_url: str
    clickhouse_database: str
    api_host: str
    api_port: int
    web_port: int
    web_host: str
    web_session_seconds: int
    web_idle_seconds: int
    prometheus_url: str  # '' when off
    grafana_url: str  # '' when off
    nats_prefix: str
    nats_replicas: int
    key_prefix: str
    metrics_dir: str
    worker_metrics_port: int
    worker_processes: int
    worker_concurrency: int
    worker_heartbeat_timeout: float
    drain_timeout: float
    system_rate: Rate
    tenant_rate: Rate
    provider_rates: dict[str, Rate]
    send_max_attempts: int
    retry_base_seconds: float
    max_body_bytes: int
    max_recipients: int
    max_upload_bytes: int
    upload_dir: str
    tenant_max_uploads: int
    body_timeout_seconds: float
    body_min_rate: int
    tenant_max_active_batches: int
    stall_seconds: float
    clickhouse_flush_rows: int
    clickhouse_flush_seconds: float
    mock_provider_enabled: bool
    mock_provider_url: str
    mock_webhook_secret: str
    public_url: str
    unsubscribe_secret: str
    credentials_keys: tuple[str, ...]
    webhook_allow_private_urls: bool
    provider_allow_private_urls: bool
    auth_failure_limit: int
    auth_failure_window_seconds: int
    trusted_proxies: tuple[Network, ...]
    smtp_host: str
    smtp_port: int
    smtp_username: str
    smtp_password: str
    smtp_tls: bool
    log_level: str

    def provider_rate(self, provider: str) -> Rate:
        return self.provider_rates.get(provider, self.system_rate)

    def provider_enabled(self, provider: str) -> bool:
        """Whether this deployment offers ``provider`` (intake, webhooks): it has a module
        and its spec enables it with these settings."""
        # Imported here: the registry loads every adapter (aiohttp, aiosmtplib), which the
        # supervisor and the CLI's other commands never use (18 MB of RSS each).
        from providers.registry import PROVIDERS

        spec = PROVIDERS.get(provider)
        return spec is not None and spec.enabled(self)

    def as_environ(self) -> dict[str, str]:
        """The settings as environment variables, for child processes started by the CLI."""
        out = {"BATCHSENDER_ENV": self.env}
        for f in fields(self):
            if f.name == "env":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Rate):
                value = f"{value.per_second!r}/{value.burst}"
            elif isinstance(value, dict):
                value = ",".join(f"{k}={r.per_second!r}/{r.burst}" for k, r in value.items())
            elif isinstance(value, tuple):
                value = ",".join(str(item) for item in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif value == "" and f.name.upper() in _OFF_WHEN_EMPTY:
                value = "off"  # '' would take the default again
            out[f.name.upper()] = str(value)
        return out


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments are skipped, quotes stripped."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ConfigError(f"{path.name}:{number}: expected KEY=VALUE")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def _env_file(env: str) -> Path | None:
    for folder in (Path.cwd(), PROJECT_ROOT):
        candidate = folder / f".env.{env}"
        if candidate.is_file():
            return candidate
    return None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings; raise ``ConfigError`` naming the first bad variable."""
    source = dict(os.environ if environ is None else environ)
    env = source.get("BATCHSENDER_ENV", "dev")
    if env not in ENVIRONMENTS:
        raise ConfigError(
            f"BATCHSENDER_ENV: must be one of {', '.join(ENVIRONMENTS)} (got {env!r})"
        )
    env_file = _env_file(env)
    merged = {**(read_env_file(env_file) if env_file else {}), **source}
    values: dict[str, Any] = {"env": env}
    for name, (parse, default) in _SCHEMA.items():
        raw = merged.get(name)
        if raw is None or raw == "":
            raw = default(values) if callable(default) else default
            if raw is None:
                where = f" (not in the environment nor in {env_file or f'.env.{env}'})"
                raise ConfigError(f"{name}: missing{where}")
        try:
            values[name.lower()] = parse(raw)
        except ValueError as exc:
            shown = "***" if "PASSWORD" in name or "SECRET" in name else raw
            raise ConfigError(f"{name}: {exc} (got {shown!r})") from None
        if env == "prod":
            _check_prod_value(name, raw, values)
    return Settings(**values)


def export_process_env(settings: Settings) -> None:
    """Set what libraries read from the environment (prometheus-client's multiprocess dir).

    Must run before ``prometheus_client`` is first imported in this process.
    """
    os.makedirs(settings.metrics_dir, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = settings.metrics_dir
