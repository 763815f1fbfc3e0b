"""Soak: SOAK_USERS users (reached within a minute) for SOAK_SECONDS, then stop.

Defaults: 20 users for 30 minutes (at most 4 hours): memory, connection pools, queue depth
and ClickHouse lag must stay flat under a steady load.
"""

from __future__ import annotations

from locust import LoadTestShape

from loadtests.shapes._bounds import MAX_SECONDS, MAX_USERS, setting


class SoakShape(LoadTestShape):
    users = int(setting("SOAK_USERS", 20, 1, MAX_USERS))
    seconds = setting("SOAK_SECONDS", 1800, 1, MAX_SECONDS)

    def tick(self) -> tuple[int, float] | None:
        if self.get_run_time() >= self.seconds:
            return None
        return self.users, max(1.0, self.users / 60)
