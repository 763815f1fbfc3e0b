"""The dashboard's pure parts: where sign-in may send you, how the API's errors land next to
their fields, the batch chart's minutes, the form's batch fields, and every template
compiling."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ValidationError
from web import render
from web.views import auth, batches, new_batch

TEMPLATES = Path(render.__file__).parent / "templates"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/batches/x?status=paused", "/batches/x?status=paused"),
        ("//evil.example/", "/batches"),
        ("https://evil.example/", "/batches"),
        ("/\\evil.example", "/batches"),
        (None, "/batches"),
        ("", "/batches"),
    ],
)
def test_sign_in_goes_only_to_this_site(target: str | None, expected: str) -> None:
    assert auth.safe_next(target) == expected


def test_field_errors_as_the_api_reports_them() -> None:
    exc = ValidationError(
        "name: is required (and 2 more)",
        {
            "errors": [
                {"field": "name", "message": "is required"},
                {"row": 3, "field": "email", "message": "is not a valid e-mail address"},
                {"field": "provider", "message": "unknown provider"},
            ]
        },
    )
    fields, rows = render.field_errors(exc)
    assert fields == {"name": ["is required"], "provider": ["unknown provider"]}
    assert rows == [{"row": 3, "field": "email", "message": "is not a valid e-mail address"}]
    one = ValidationError("limit: must be between 1 and 1000", {"field": "limit"})
    assert render.field_errors(one) == ({"limit": ["must be between 1 and 1000"]}, [])


def test_the_batch_chart_fills_its_minutes() -> None:
    chart = batches.chart_of(
        [
            {"minute": "2026-12-02T10:03:00Z", "event": "delivered", "count": 5},
            {"minute": "2026-12-02T10:01:00Z", "event": "sent", "count": 7},
            {"minute": "2026-12-02T10:03:00Z", "event": "sent", "count": 2},
        ]
    )
    lead = batches.CHART_LEAD_MINUTES
    assert len(chart["x"]) == lead + 3 and chart["x"][1] - chart["x"][0] == 60
    assert [s["label"] for s in chart["series"]] == ["sent", "delivered"]
    assert chart["series"][0]["values"][lead:] == [7, 0, 2]
    assert chart["series"][1]["values"][lead:] == [0, 0, 5]
    assert batches.chart_of([])["x"] == []


def test_the_form_makes_the_apis_batch_fields() -> None:
    data = new_batch.batch_fields(
        {
            "name": " News ",
            "from_email": "a@example.com",
            "from_name": "",
            "subject": "Hi",
            "html": "  <p>x</p>\n",
            "send_through": "account:sendgrid-eu",
            "dry_run": "on",
            "scheduled_at": "2030-01-01T10:00",
        }
    )
    assert data == {
        "name": "News",
        "from_email": "a@example.com",
        "subject": "Hi",
        "html": "  <p>x</p>\n",
        "scheduled_at": "2030-01-01T10:00",
        "provider_account": "sendgrid-eu",
        "dry_run": True,
        "draft": False,
    }
    assert new_batch.batch_fields({"send_through": "provider:mock"})["provider"] == "mock"


def test_every_template_compiles_and_escapes() -> None:
    for path in TEMPLATES.rglob("*.html"):
        render.ENV.get_template(str(path.relative_to(TEMPLATES)))
    html = render.render(
        "_alert.html", level="error", title="<b>x</b>", message="<script>alert(1)</script>"
    )
    assert "<script>" not in html and "&lt;script&gt;" in html


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "—"), (4.4, "4 s"), (65, "1 min 5 s"), (3600, "1 h"), (200000, "2 d 7 h")],
)
def test_durations(seconds: float | None, text: str) -> None:
    assert render.duration(seconds) == text


def test_web_settings() -> None:
    from engine.config import ConfigError, load_settings

    base = {"DATABASE_URL": "postgresql://x@127.0.0.1/x", "NATS_URL": "nats://127.0.0.1:4222",
            "DRAGONFLY_URL": "redis://127.0.0.1:6379/0", "CLICKHOUSE_URL": "http://127.0.0.1:8123",
            "API_PORT": "6001", "WEB_PORT": "3000"}  # fmt: skip
    dev = load_settings({**base, "BATCHSENDER_ENV": "dev"})
    assert (dev.web_host, dev.web_port) == ("127.0.0.1", 3000)
    assert dev.prometheus_url == "http://127.0.0.1:9090"
    assert (dev.web_session_seconds, dev.web_idle_seconds) == (43200, 3600)
    test = load_settings({**base, "BATCHSENDER_ENV": "test"})
    assert (test.prometheus_url, test.grafana_url) == ("", "")
    off = load_settings({**base, "BATCHSENDER_ENV": "dev", "PROMETHEUS_URL": "off"})
    assert off.prometheus_url == ""
    assert load_settings(off.as_environ()).prometheus_url == ""  # 'off' survives a child
    custom = load_settings({**base, "BATCHSENDER_ENV": "test", "GRAFANA_URL": "https://g.example/"})
    assert custom.grafana_url == "https://g.example"
    with pytest.raises(ConfigError, match="PROMETHEUS_URL"):
        load_settings({**base, "BATCHSENDER_ENV": "test", "PROMETHEUS_URL": "ftp://x"})
    with pytest.raises(ConfigError, match="WEB_IDLE_SECONDS"):
        load_settings({**base, "BATCHSENDER_ENV": "test", "WEB_IDLE_SECONDS": "5"})
