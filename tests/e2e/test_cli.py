"""The ``batchsender`` command as an operator uses it, against the running processes."""

from __future__ import annotations

import subprocess

from tests.e2e.conftest import Client, command


def _run(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(*args), env=stack.environ, capture_output=True, text=True, timeout=120
    )


async def test_keys_create_prints_a_key_that_the_api_accepts(stack):
    created = _run(stack, "keys", "create", "--tenant", "cli-tenant")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("bsk_")
    status, page = await Client(stack, key).request("GET", f"{stack.api}/api/batches")
    assert status == 200 and page["data"] == []
    bad = _run(stack, "keys", "create", "--tenant", "Not A Tenant!")
    assert bad.returncode != 0


async def test_send_streams_a_csv_file_and_follows_it_to_the_end(stack, tenant, tmp_path):
    rows = "\n".join(f"c{i}@example.com,Name {i},{i}" for i in range(250))
    path = tmp_path / "people.csv"
    path.write_text("email,name,code\n" + rows + "\n")
    sent = _run(stack, "send", str(path), "--key", tenant[1], "--subject", "Hi {{ name }}",
                "--from-email", "ops@example.com", "--text", "Code {{ code }}", "--api-url", stack.api)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    batch_id = sent.stdout.strip()
    assert "completed" in sent.stderr and "250" in sent.stderr
    status, batch = await Client(stack, tenant[1]).request(
        "GET", f"{stack.api}/api/batches/{batch_id}"
    )
    assert status == 200 and batch["status"] == "completed" and batch["total_recipients"] == 250


async def test_send_reports_bad_rows_and_fails(stack, tenant, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("email,name\ngood@example.com,A\nnot-an-address,B\n")
    sent = _run(stack, "send", str(path), "--key", tenant[1], "--subject", "Hi",
                "--from-email", "ops@example.com", "--text", "x", "--api-url", stack.api)  # fmt: skip
    assert sent.returncode == 1
    assert "recipient 2" in sent.stderr


def test_a_bad_setting_stops_with_one_line_naming_it(stack):
    environ = {**stack.environ, "NATS_URL": "http://wrong"}
    run = subprocess.run(
        command("migrate"), env=environ, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "batchsender: configuration error: NATS_URL: must be a nats:///tls:// URL (got 'http://wrong')"
    ]
