"""The web dashboard in a real headless Chromium (Debian's ``chromium``, driven by
Playwright through ``executable_path``; Playwright's own browser download is not used),
against ``batchsender web`` on the e2e session's stack, with a real Prometheus for the
Performance page.

Signing in, a CSV of 1,000 recipients uploaded through the New batch form and watched to
``completed`` without a reload, pause and resume of another batch, the analytics chart with
data, a key created and revoked (its session ends), another tenant's batch answering 404,
a form posted without its CSRF token refused, "Test credentials" of two provider accounts
(at fake SendGrid and Postmark servers this test runs: one works, one is refused) shown in
the page's live region, and axe-core (``axe.min.js`` of the axe-playwright-python package)
finding no serious or critical violation on any page. A
screenshot of every page is saved in the folder the test prints (``WEB_SCREENSHOTS`` to
choose it; ``web/screenshots/`` holds the set the README shows).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import orjson
import playwright.async_api as playwright_api
import pytest

from devkit.fakes import postmark
from devkit.fakes.sendgrid import FakeSendGrid
from devkit.prometheus import Prometheus
from devkit.stack import http_ok, wait_until
from engine import tenants
from engine.db import create_pool
from tests.e2e.conftest import Client, Stack, ensure_workers

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
RATE = "250/25"  # the tenant's send rate: a 1,000 batch takes seconds, so its progress shows
SENDGRID_KEY = "SG.test-credential-0123456789"  # the seeded account's key, which its fake takes
SEEN = """() => { window.__kept = 'no reload'; window.__seen = [];
  document.body.addEventListener('htmx:afterSettle', () => {
    const s = document.querySelector('#batch-status'), p = document.querySelector('#summary progress');
    if (s && p) window.__seen.push([s.dataset.status, Number(p.value)]); }); }"""


def _axe_script() -> str:
    import axe_playwright_python

    return (Path(axe_playwright_python.__file__).parent / "axe.min.js").read_text()


@dataclass
class Dashboard:
    url: str
    stack: Stack
    tenant: str
    key: str
    other_key: str
    api: Client
    other: Client
    shots: Path
    browser: object
    state: dict


@pytest.fixture(scope="module")
async def dash(stack: Stack, tmp_path_factory) -> AsyncIterator[Dashboard]:
    if not HAVE_CHROMIUM:
        pytest.fail("Debian's chromium is not installed (setup-dev.sh test installs it)")
    await ensure_workers(stack)
    tenant, other = f"w{uuid.uuid4().hex[:8]}", f"x{uuid.uuid4().hex[:8]}"
    pool = await create_pool(stack.settings, max_size=1)
    try:
        key, other_key = (
            await tenants.create_key(pool, tenant),
            await tenants.create_key(pool, other),
        )
        await tenants.set_limits(pool, tenant, send_rate=RATE)
    finally:
        await pool.close()
    shots = Path(os.environ.get("WEB_SCREENSHOTS") or tempfile.mkdtemp(prefix="bs-web-screens-"))
    await asyncio.to_thread(shots.mkdir, parents=True, exist_ok=True)
    print(f"\nscreenshots of every dashboard page: {shots}")
    prom = Prometheus(f"127.0.0.1:{stack.settings.api_port}").start()
    url = f"http://127.0.0.1:{stack.settings.web_port}"
    stack.environ.update(PROMETHEUS_URL=prom.url, GRAFANA_URL="http://127.0.0.1:3003")
    try:
        stack.start("web", "web")
    finally:
        del stack.environ["PROMETHEUS_URL"], stack.environ["GRAFANA_URL"]
    try:
        await asyncio.to_thread(wait_until, lambda: http_ok(f"{url}/health/live"), 30)
        await asyncio.to_thread(prom.wait_ready)
        api, other_api = Client(stack, key), Client(stack, other_key)
        async with (
            FakeSendGrid(SENDGRID_KEY) as sendgrid_fake,
            postmark.serving() as (postmark_url, _),
            playwright_api.async_playwright() as p,
        ):
            await _seed(stack, api, tenant, sendgrid_fake.url, postmark_url)
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            try:
                yield Dashboard(
                    url, stack, tenant, key, other_key, api, other_api, shots, browser, {}
                )
            finally:
                await browser.close()
    finally:
        stack.stop("web")
        prom.stop()


async def _seed(
    stack: Stack, api: Client, tenant: str, sendgrid_url: str, postmark_url: str
) -> None:
    """What the pages show besides the batches: suppressions, two accounts (at the fakes:
    one whose credentials work, one whose token the fake refuses), an endpoint, a dead
    letter (a batch published to NATS with fields missing)."""
    status, _ = await api.post_json(f"{stack.api}/api/suppressions",
                                    {"emails": ["bounced@example.com", "old@example.org"]})  # fmt: skip
    assert status == 201
    for account in (
        {"name": "sendgrid-eu", "provider": "sendgrid", "rate_per_second": 100,
         "credentials": {"api_key": SENDGRID_KEY}, "daily_quota": 50000, "base_url": sendgrid_url},
        {"name": "postmark-old", "provider": "postmark", "rate_per_second": 50,
         "credentials": {"server_token": "pm-revoked-token-0123456789"}, "base_url": postmark_url},
    ):  # fmt: skip
        status, _ = await api.post_json(f"{stack.api}/api/provider-accounts", account)
        assert status == 201
    status, _ = await api.post_json(
        f"{stack.api}/api/webhook-endpoints",
        {"url": "http://127.0.0.1:9/hooks", "event_types": ["delivered", "bounced"],
         "description": "CRM sync"},
    )  # fmt: skip
    assert status == 201
    nc = await nats.connect(stack.settings.nats_url)
    try:
        subject = f"{stack.settings.nats_prefix}.intake.{tenant}"
        await nc.jetstream().publish(subject, orjson.dumps({"name": "no fields"}),
                                     headers={"Nats-Msg-Id": uuid.uuid4().hex})  # fmt: skip
    finally:
        await nc.close()


async def _context(dash: Dashboard, key: str | None = None, *, bypass_csp: bool = True):
    """A browser context; ``bypass_csp`` lets the test evaluate its own scripts (axe-core,
    wait_for_function) beside the pages' strict Content-Security-Policy."""
    context = await dash.browser.new_context(
        viewport={"width": 1320, "height": 860}, bypass_csp=bypass_csp
    )
    context.set_default_timeout(20_000)
    page = await context.new_page()
    page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    if key is not None:
        await _sign_in(dash, page, key)
    return context, page


async def _sign_in(dash: Dashboard, page, key: str) -> None:
    await page.goto(f"{dash.url}/login")
    await page.fill("#api_key", key)
    await page.click("button[type=submit]")
    await page.wait_for_url(re.compile(r"/batches$"))


async def _shot(dash: Dashboard, page, name: str) -> None:
    """The whole page: the viewport made as tall as the page first (a full-page capture
    leaves out-of-view sandboxed frames blank and moves the sticky sidebar)."""
    size = page.viewport_size
    height = await page.evaluate("document.documentElement.scrollHeight")
    await page.set_viewport_size({"width": size["width"], "height": min(max(height, 400), 5000)})
    await page.wait_for_timeout(150)
    await page.screenshot(path=str(dash.shots / f"{name}.png"))
    await page.set_viewport_size(size)


async def _signed_in(dash: Dashboard):
    if "page" not in dash.state:
        dash.state["context"], dash.state["page"] = await _context(dash, dash.key)
    return dash.state["page"]


async def test_sign_in(dash: Dashboard) -> None:
    context, page = await _context(dash, bypass_csp=False)  # the pages under their own CSP
    refused: list[str] = []
    page.on(
        "console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None
    )
    try:
        await page.goto(f"{dash.url}/batches")
        assert "/login" in page.url
        await _shot(dash, page, "00-login")
        await page.fill("#api_key", "bsk_not-a-key-of-anyone")
        await page.click("button[type=submit]")
        await page.wait_for_selector("text=That API key is not valid")
        await page.fill("#api_key", dash.key)
        await page.click("button[type=submit]")
        await page.wait_for_url(re.compile(r"/batches$"))
        assert dash.tenant in await page.inner_text(".sidebar .tenant")
        cookie = next(c for c in await context.cookies() if c["name"] == "bs_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        await page.goto(f"{dash.url}/analytics?range=1h")  # htmx, uPlot and app.js run
        await page.wait_for_selector("#volume-chart canvas")
        assert not refused, refused
    finally:
        await context.close()


async def test_a_csv_batch_progresses_live_to_completed(dash: Dashboard) -> None:
    page = await _signed_in(dash)
    await page.goto(f"{dash.url}/batches/new")
    csv = "email,name,code\n" + "".join(
        f"r{i}@example.com,Reader {i},C{i:04d}\n" for i in range(1000)
    )
    await page.fill("#name", "December newsletter")
    await page.fill("#from_email", "news@example.com")
    await page.fill("#from_name", "Acme News")
    await page.fill("#subject", "Hello {{ name }} bs-subject-marker-9c2e")
    await page.fill(
        "#html", "<h1>Hi {{ name }}</h1><p>Your code is <b>{{ code }}</b>.</p> bs-body-marker-5d1f"
    )
    await page.fill("#text", "Hi {{ name }}, your code is {{ code }}. bs-body-marker-5d1f")
    await page.select_option("#send_through", "provider:mock")
    await page.set_input_files("#csv_file", files=[{"name": "readers.csv", "mimeType": "text/csv",
                                                    "buffer": csv.encode()}])  # fmt: skip
    await page.click("#preview-button")
    await page.wait_for_selector("#preview .message-subject")
    assert "Hello Reader 0" in await page.inner_text("#preview")
    assert await page.locator("#preview article.message").count() == 3
    for i in range(3):  # each message's HTML, rendered in its sandboxed frame
        frame = page.frame_locator("#preview iframe.message-html").nth(i)
        await frame.locator("h1", has_text=f"Hi Reader {i}").wait_for()
    await _shot(dash, page, "02-new-batch-preview")
    await page.click("#create-button")
    await page.wait_for_url(re.compile(r"/batches/[0-9a-f-]{36}$"))
    dash.state["batch_url"] = page.url
    await page.evaluate(SEEN)
    await page.wait_for_function(
        "document.querySelector('#batch-status').dataset.status === 'completed'", timeout=60_000
    )
    assert await page.evaluate("window.__kept") == "no reload"
    seen = await page.evaluate("window.__seen")
    assert any(0 < value < 1000 for _, value in seen) or any(
        s in ("queued", "processing") for s, _ in seen
    ), f"no progress seen before completion: {seen}"
    assert "1,000" in await page.inner_text("#summary")
    await page.goto(f"{dash.url}/batches")
    assert "December newsletter" in await page.inner_text("#batch-table")


async def test_pause_and_resume_another_batch(dash: Dashboard) -> None:
    page = await _signed_in(dash)
    batch_id = await dash.api.create(5000, name="Pause me")
    await page.goto(f"{dash.url}/batches/{batch_id}")
    await page.evaluate(SEEN)
    await page.wait_for_function(
        "['queued', 'processing'].includes(document.querySelector('#batch-status').dataset.status)"
    )
    await page.click("#action-pause")
    await page.wait_for_function(
        "document.querySelector('#batch-status').dataset.status === 'paused'", timeout=1_500
    )
    assert (await dash.api.batch(batch_id))["status"] == "paused"
    await page.click("#action-resume")
    await page.wait_for_function(
        "['queued', 'processing', 'completed'].includes("
        "document.querySelector('#batch-status').dataset.status)",
        timeout=1_500,
    )
    assert (await dash.api.batch(batch_id))["status"] in ("queued", "processing", "completed")
    await _shot(dash, page, "04-batch-running")
    await page.click("#action-cancel")  # ends it (the confirmation is accepted)
    await page.wait_for_function(
        "document.querySelector('#batch-status').dataset.status === 'cancelled'", timeout=3_000
    )


async def test_the_analytics_chart_renders_with_data(dash: Dashboard) -> None:
    page = await _signed_in(dash)
    for _ in range(30):  # the events reach ClickHouse within a second or two
        await page.goto(f"{dash.url}/analytics?range=1h")
        await page.wait_for_selector("#volume-chart[data-points], #volume-chart[data-error]")
        if int(await page.get_attribute("#volume-chart", "data-points") or 0) > 0:
            break
        await asyncio.sleep(1)
    assert int(await page.get_attribute("#volume-chart", "data-points") or 0) > 0
    assert await page.locator("#volume-chart canvas").count() == 1
    assert await page.locator("#rates-chart canvas").count() == 1
    table = await page.inner_text("section[aria-labelledby=providers-title]")
    assert "mock" in table
    await page.goto(dash.state["batch_url"])
    await page.wait_for_selector("#batch-chart[data-points]")
    assert int(await page.get_attribute("#batch-chart", "data-points")) > 0
    assert (await page.inner_text("[data-bind='latency_ms.samples']")).replace(",", "") == "1000"


async def test_create_and_revoke_a_key_ends_its_session(dash: Dashboard) -> None:
    page = await _signed_in(dash)
    await page.goto(f"{dash.url}/keys")
    await page.click("#create-key")
    new_key = (await page.inner_text("#new-key")).strip()
    assert new_key.startswith("bsk_")
    await _shot(dash, page, "06-keys-created")
    await page.goto(f"{dash.url}/keys")
    assert new_key not in await page.content()  # shown once
    other_context, other_page = await _context(dash, new_key)
    try:
        await other_page.goto(f"{dash.url}/suppressions")
        assert "/suppressions" in other_page.url
        await page.click(f"button[aria-label='Revoke key {new_key[:10]}']")
        await page.wait_for_selector("text=is revoked")
        await other_page.goto(f"{dash.url}/suppressions")
        assert "/login" in other_page.url and "reason=revoked" in other_page.url
        assert "was revoked" in await other_page.inner_text("main")
    finally:
        await other_context.close()
    await page.goto(f"{dash.url}/batches")  # the session's own key still works
    assert page.url.endswith("/batches")


async def test_another_tenants_batch_answers_404(dash: Dashboard) -> None:
    page = await _signed_in(dash)
    theirs = await dash.other.create(3, name="Theirs")
    response = await page.goto(f"{dash.url}/batches/{theirs}")
    assert response.status == 404
    assert "Not found" in await page.inner_text("main")
    await _shot(dash, page, "12-not-found")
    response = await page.request.post(f"{dash.url}/batches/{theirs}/cancel",
                                       headers={"X-CSRF-Token": await _token(page)})  # fmt: skip
    assert response.status == 404
    assert (await dash.other.batch(theirs))["status"] != "cancelled"


async def _token(page) -> str:
    return await page.get_attribute("input[name=csrf_token]", "value")


async def test_a_form_without_its_csrf_token_is_refused(dash: Dashboard) -> None:
    page = await _signed_in(dash)
    await page.goto(f"{dash.url}/suppressions")
    refused = await page.request.post(
        f"{dash.url}/suppressions", form={"emails": "csrf@example.com"}
    )
    assert refused.status == 403
    assert "security token" in await refused.text()
    wrong = await page.request.post(
        f"{dash.url}/suppressions", form={"emails": "csrf@example.com", "csrf_token": "forged"}
    )
    assert wrong.status == 403
    accepted = await page.request.post(
        f"{dash.url}/suppressions",
        form={"emails": "csrf@example.com", "csrf_token": await _token(page)},
    )
    assert accepted.status == 200 and "Added 1 address" in await accepted.text()


PAGES = [
    ("01-batches", "/batches"),
    ("02-new-batch", "/batches/new"),
    ("03-batch-detail", None),
    ("05-analytics", "/analytics?range=1h"),
    ("07-queue", "/queue"),
    ("08-suppressions", "/suppressions"),
    ("09-keys", "/keys"),
    ("10-provider-accounts", "/provider-accounts"),
    ("11-webhooks", "/webhooks"),
    ("11-webhook-deliveries", "webhook"),
    ("12-not-found", "/batches/00000000-0000-0000-0000-000000000000"),
    ("13-performance", "/performance"),
]


async def test_every_page_is_accessible_and_screenshotted(dash: Dashboard) -> None:
    page = await _signed_in(dash)
    axe = _axe_script()
    problems: list[str] = []
    await page.goto(f"{dash.url}/webhooks")
    webhook = await page.get_attribute("a[href^='/webhooks/']", "href")
    for name, path in PAGES:
        url = (
            dash.state["batch_url"]
            if path is None
            else f"{dash.url}{webhook if path == 'webhook' else path}"
        )
        response = await page.goto(url)
        assert response.status == (404 if name == "12-not-found" else 200), (name, response.status)
        await page.wait_for_load_state("networkidle")
        if await page.locator("[data-chart]").count():
            await page.wait_for_function(
                "[...document.querySelectorAll('[data-chart]')].every("
                "f => f.hasAttribute('data-points') || f.hasAttribute('data-error'))"
            )
        if name == "13-performance":
            errors = await page.eval_on_selector_all("[data-chart][data-error]", "e => e.length")
            assert errors == 0, "the Performance page could not read Prometheus"
        await _shot(dash, page, name)
        problems += await _axe(page, axe, name)
    context, bare = await _context(dash)
    try:
        await bare.goto(f"{dash.url}/login")
        problems += await _axe(bare, axe, "00-login")
    finally:
        await context.close()
    assert not problems, "axe-core: serious or critical violations:\n" + "\n".join(problems)
    narrow = await dash.browser.new_page(viewport={"width": 390, "height": 844})
    try:
        await _sign_in(dash, narrow, dash.key)
        await narrow.goto(dash.state["batch_url"])
        await _shot(dash, narrow, "14-batch-detail-phone")
        width = await narrow.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, f"the page scrolls sideways on a phone ({width}px)"
    finally:
        await narrow.close()


async def test_test_credentials_shows_the_result_inline(dash: Dashboard) -> None:
    """After the page tour, so that its screenshot shows a result."""
    page = await _signed_in(dash)
    await page.goto(f"{dash.url}/provider-accounts")
    region = page.locator("#check-result")
    assert await region.get_attribute("role") == "status"
    assert await region.get_attribute("aria-live") == "polite"
    await page.click("button[aria-label='Test credentials of account postmark-old']")
    refused = region.locator(".alert-error[data-account='postmark-old']")
    await refused.wait_for()
    text = await refused.inner_text()
    assert "postmark-old: the check failed." in text
    assert "Postmark refused the server token (HTTP 401)" in text
    assert "pm-revoked-token-0123456789" not in await page.content()
    await page.click("button[aria-label='Test credentials of account sendgrid-eu']")
    works = region.locator(".alert-ok[data-account='sendgrid-eu']")
    await works.wait_for()
    assert "sendgrid-eu: the credentials work." in await works.inner_text()
    assert "may send mail (mail.send)" in await works.inner_text()
    assert page.url.endswith("/provider-accounts")  # no page load
    problems = await _axe(page, _axe_script(), "10-provider-accounts (tested)")
    assert not problems, "axe-core: serious or critical violations:\n" + "\n".join(problems)
    await _shot(dash, page, "10-provider-accounts")


async def _axe(page, script: str, name: str) -> list[str]:
    await page.add_script_tag(content=script)
    result = await page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".map(v => ({id: v.id, impact: v.impact, help: v.help,"
        " nodes: v.nodes.slice(0, 3).map(n => n.target.join(' '))}))"
    )
    return [
        f"{name}: {v['impact']} {v['id']} ({v['help']}): {v['nodes']}"
        for v in result
        if v["impact"] in ("serious", "critical")
    ]
