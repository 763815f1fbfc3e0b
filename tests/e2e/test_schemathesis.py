"""The live API against its own OpenAPI document (issue 8): schemathesis generates requests
for every operation, with a valid key and without, and checks every answer: no 5xx, each
answer's status and body as documented, 405 with ``Allow`` for methods that are not
served (TRACE and OPTIONS included), bad input refused, valid input accepted.

The number of examples is bounded (``MAX_EXAMPLES`` per operation, and a seed, so a run
is repeatable); the whole run takes about a minute. One worker: hypothesis parses
source with ``ast`` from several threads otherwise, which CPython 3.11 does not survive
("AST constructor recursion depth mismatch").
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack

CONFIG = Path(__file__).with_name("schemathesis.toml")

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 25
SEED = 8


def schemathesis(stack: Stack, *extra: str) -> subprocess.CompletedProcess[str]:
    script = shutil.which("schemathesis") or shutil.which("st")
    command = [script] if script else [sys.executable, "-m", "schemathesis.cli"]
    return subprocess.run(
        [*command, "--config-file", str(CONFIG), "run", f"{stack.api}/api/openapi.json",
         "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
         "--request-timeout", "30", "--max-failures", "20", *extra],
        capture_output=True, text=True, timeout=900, cwd=stack.logs,
    )  # fmt: skip


def report(run: subprocess.CompletedProcess[str]) -> str:
    """The run's output with long lines cut (generated values can be kilobytes long)."""
    lines = (run.stdout + run.stderr).splitlines()
    return "\n".join(line if len(line) < 300 else line[:300] + " ..." for line in lines)[-30_000:]


def test_every_operation_with_a_valid_key(stack: Stack, tenant: tuple[str, str]) -> None:
    _, key = tenant
    run = schemathesis(stack, "--header", f"Authorization: Bearer {key}")
    assert run.returncode == 0, report(run)


def test_every_operation_without_a_key(stack: Stack) -> None:
    run = schemathesis(stack)
    assert run.returncode == 0, report(run)
