"""The live API against its own OpenAPI document (issue 8): schemathesis generates requests
for every operation, with a valid key and without, and checks every answer: no 5xx, each
answer's status and body as documented, 405 with ``Allow`` for methods that are not
served (TRACE and OPTIONS included), bad input refused, valid input accepted. Then every
documented status must have been answered in those runs, or be one that needs what a
generator cannot make (``NEEDS``, each with the test that produces it).

The number of examples is bounded (``MAX_EXAMPLES`` per operation, and a seed, so a run
is repeatable); the whole run takes about a minute. One worker: hypothesis parses source
with ``ast`` from several threads otherwise, which CPython 3.11 does not survive ("AST
constructor recursion depth mismatch").
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from api.openapi import OPENAPI
from engine.db import create_pool
from engine.tenants import create_key
from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

CONFIG = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 25
SEED = 8

# Documented statuses a generated request cannot bring about, and where each is shown.
NEEDS = {
    "400": "a NUL character or text that is not UTF-8 in the path or query, which schemathesis "
    "does not send (test_hostile_input: test_bad_query_and_path_text_is_a_4xx)",
    "408": "a body that stalls or trickles (test_hostile_input: test_a_stalled_body_gets_408)",
    "413": "a body larger than the limits (tests/integration/test_api.py: too large bodies)",
    "429": "a tenant over a limit or an address with many failed keys "
    "(test_hostile_input, test_control, test_keys)",
    "503": "a service that is down (test_api: test_health_names_clickhouse_when_it_is_down)",
    "409": "a batch, key or Idempotency-Key in another state (test_control, test_api, test_keys)",
    "410": "an expired unsubscribe link (test_suppressions)",
    "415": "an unsupported Content-Type (test_api)",
    "200": "an existing resource or a valid signature or token (test_api, test_webhooks, "
    "test_suppressions, test_queue)",
    "201": "a valid batch (test_api, test_hostile_input)",
    "204": "an existing key or suppression (test_keys, test_suppressions)",
    "202": "an existing webhook delivery to replay (test_webhook_endpoints: replay)",
    "502": "an SNS confirmation URL that does not answer (test_webhook_accounts: a failed "
    "subscription confirmation)",
}

# Statuses of one operation the runs did not reach although a generator could (schemathesis
# sends /webhooks/{provider} only schema-violating provider names (404), never the enum's
# "mock"), each with where it is shown.
NOT_REACHED = {
    ("POST /webhooks/{provider}", "401"): "tests/integration/test_webhooks.py (bad, stale and "
    "replayed signatures)",
    # Only an existing account's route checks a signature; generated ids name none (404).
    ("POST /webhooks/{provider}/{account_id}", "401"): "tests/integration/"
    "test_webhook_accounts.py (bad, stale and replayed signatures per provider)",
    # A body is validated before the account is looked up: generated bodies fail as 422.
    ("PUT /api/provider-accounts/{ref}", "404"): "tests/integration/test_provider_accounts.py "
    "(test_an_account_is_replaced_whole_but_keeps_its_provider)",
}


def schemathesis(stack: Stack, report: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    script = shutil.which("schemathesis") or shutil.which("st")
    command = [script] if script else [sys.executable, "-m", "schemathesis.cli"]
    return subprocess.run(
        [*command, "--config-file", str(CONFIG), "run", f"{stack.api}/api/openapi.json",
         "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
         "--request-timeout", "30", "--max-failures", "20",
         "--report", "ndjson", "--report-ndjson-path", str(report), *extra],
        capture_output=True, text=True, timeout=900, cwd=stack.logs,
    )  # fmt: skip


def report(run: subprocess.CompletedProcess[str]) -> str:
    """The run's output with long lines cut (generated values can be kilobytes long)."""
    lines = (run.stdout + run.stderr).splitlines()
    return "\n".join(line if len(line) < 300 else line[:300] + " ..." for line in lines)[-30_000:]


def answered(path: Path) -> set[tuple[str, str]]:
    """(``"METHOD /path"``, status) of every answer recorded in a run's NDJSON report."""
    seen = set()
    for line in path.read_bytes().splitlines():
        event = orjson.loads(line).get("ScenarioFinished") or {}
        recorder = event.get("recorder") or {}
        for interaction in (recorder.get("interactions") or {}).values():
            if interaction.get("response"):
                seen.add((recorder["label"], str(interaction["response"]["status_code"])))
    return seen


@pytest.fixture(scope="module")
async def runs(stack: Stack) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Both runs, once: with a key of a tenant of their own, and without a key."""
    pool = await create_pool(stack.settings, max_size=1)
    try:
        key = await create_key(pool, f"st{uuid.uuid4().hex[:10]}")
    finally:
        await pool.close()
    with_key, without = stack.logs / "st-key.ndjson", stack.logs / "st-nokey.ndjson"
    return {
        "key": (schemathesis(stack, with_key, "--header", f"Authorization: Bearer {key}"), with_key),
        "none": (schemathesis(stack, without), without),
    }  # fmt: skip


def test_every_operation_with_a_valid_key(runs) -> None:
    run, _ = runs["key"]
    assert run.returncode == 0, report(run)


def test_every_operation_without_a_key(runs) -> None:
    run, _ = runs["none"]
    assert run.returncode == 0, report(run)


def test_every_documented_status_is_answered_or_needs_a_condition(runs) -> None:
    seen = answered(runs["key"][1]) | answered(runs["none"][1])
    documented = {
        (f"{method.upper()} {path}", status)
        for path, item in OPENAPI["paths"].items()
        for method, operation in item.items()
        for status in operation["responses"]
    }
    never = sorted(
        (op, status)
        for op, status in documented - seen
        if status not in NEEDS and (op, status) not in NOT_REACHED
    )
    assert not never, f"documented, never answered, no reason in NEEDS: {never!r}"
