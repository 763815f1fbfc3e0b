"""A small run of the benchmark, so it does not rot (the real runs are not timed tests)."""

from __future__ import annotations

import subprocess
import sys

from devkit.stack import ROOT


def test_the_whole_benchmark_runs_small():
    """``python -m bench --quick``: floor, BatchSender, peers, rate, latency, summary."""
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "every recipient exactly once: yes" in run.stdout
    assert "every delivered webhook posted and applied: yes" in run.stdout
    for figure in ("Floor: send path", "Peer celery:", "rate 2,000/s", "latency p50"):
        assert figure in run.stdout
    assert "Peer celery-chunked: could not run" not in run.stdout
    assert "Peer celery-chunked:" in run.stdout


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
