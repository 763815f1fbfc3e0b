"""A small run of the benchmark, so it does not rot (the real runs are not timed tests)."""

from __future__ import annotations

import subprocess
import sys

from bench.stack import ROOT


def test_bench_e2e_runs_and_checks_exactly_once():
    run = subprocess.run(
        [sys.executable, "-m", "bench.e2e", "--recipients", "3000", "--workers", "1",
         "--nats", "--nats-recipients", "500"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "end-to-end:" in run.stdout
    assert "ok: every recipient exactly once" in run.stdout


def test_locust_load_test_runs_without_failures(stack, tenant):
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless",
         "-u", "3", "-r", "3", "-t", "5s", "--host", stack.api, "--only-summary",
         "--exit-code-on-error", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**stack.environ, "BATCHSENDER_API_KEY": tenant[1], "LOADTEST_RECIPIENTS": "20"},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "/api/batches [POST]" in run.stdout + run.stderr
