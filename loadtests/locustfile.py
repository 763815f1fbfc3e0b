"""Locust load test of the REST API: many small batches and status reads.

    ./setup-dev.sh        # the stack, with its API key in .dev/api-key
    locust -f loadtests/locustfile.py --headless -u 20 -r 5 -t 60s --host http://127.0.0.1:6001

Bounded by ``-t``; it stops by itself. The key comes from BATCHSENDER_API_KEY or .dev/api-key.
Each user creates batches of ``RECIPIENTS`` recipients to the mock provider and reads them back.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import orjson
from locust import HttpUser, between, task

RECIPIENTS = int(os.environ.get("LOADTEST_RECIPIENTS", "100"))


def _key() -> str:
    key = os.environ.get("BATCHSENDER_API_KEY")
    if key:
        return key
    path = Path(__file__).resolve().parents[1] / ".dev" / "api-key"
    return path.read_text().strip()


class BatchUser(HttpUser):
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {_key()}"
        self.batches: list[str] = []

    @task(1)
    def create_batch(self) -> None:
        tag = random.randrange(1 << 30)
        body = {
            "name": f"locust {tag}",
            "from_email": "load@example.com",
            "subject": "Hi {{ name }}",
            "text": "Load test {{ name }}",
            "provider": "mock",
            "recipients": [
                {"email": f"l{tag}.{i}@example.com", "name": f"L{i}"} for i in range(RECIPIENTS)
            ],
        }
        with self.client.post(
            "/api/batches",
            data=orjson.dumps(body),
            catch_response=True,
            headers={"Content-Type": "application/json"},
            name="/api/batches [POST]",
        ) as r:
            if r.status_code == 201:
                self.batches = (self.batches + [r.json()["id"]])[-20:]
            else:
                r.failure(f"{r.status_code}: {r.text[:200]}")

    @task(4)
    def read_batch(self) -> None:
        if self.batches:
            self.client.get(f"/api/batches/{random.choice(self.batches)}", name="/api/batches/{id}")

    @task(1)
    def list_batches(self) -> None:
        self.client.get("/api/batches?limit=20", name="/api/batches [GET]")
