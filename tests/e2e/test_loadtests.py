"""The Locust users and a load shape, headless for a few seconds against this session's
throw-away stack: every kind of user (REST, NATS publisher, signed webhooks) makes
requests and none fails, the shape stops the run by itself, the CSV files are written."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from devkit.stack import ROOT

pytestmark = pytest.mark.e2e


def test_every_user_runs_under_a_step_shape_and_writes_csv(stack, tenant, tmp_path):
    tenant_id, key = tenant
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py,loadtests/shapes/step.py",
         "--headless", "--host", stack.api, "--csv", str(tmp_path / "run"),
         "--only-summary", "--exit-code-on-error", "1", "--stop-timeout", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**stack.environ, "BATCHSENDER_API_KEY": key, "LOADTEST_TENANT": tenant_id,
             "LOADTEST_USERS": "rest,nats,webhooks", "LOADTEST_RECIPIENTS": "20",
             "STEP_USERS": "3", "STEP_SECONDS": "3", "STEPS": "2"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as handle:
        stats = {(row["Type"], row["Name"]): row for row in csv.DictReader(handle)}
    names = {name for _, name in stats}
    assert "/api/batches [POST]" in names
    assert "/webhooks/mock [POST 100 events]" in names
    assert any(kind == "NATS" and ".intake.{tenant}" in name for kind, name in stats)
    for (kind, name), row in stats.items():
        if name != "Aggregated":
            assert int(row["Request Count"]) > 0 and row["Failure Count"] == "0", (kind, name, row)
    assert (tmp_path / "run_stats_history.csv").stat().st_size > 0
