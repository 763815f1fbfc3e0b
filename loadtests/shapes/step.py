"""Step load: STEP_USERS more users every STEP_SECONDS, STEPS times, then stop.

Defaults: +10 users every 60 s, 5 steps (50 users, 5 minutes). The backlog should grow by
steps and the workers follow it (the autoscaler's reaction to each step).
"""

from __future__ import annotations

from locust import LoadTestShape

from loadtests.shapes._bounds import MAX_SECONDS, MAX_USERS, setting


class StepShape(LoadTestShape):
    step_users = int(setting("STEP_USERS", 10, 1, MAX_USERS))
    step_seconds = setting("STEP_SECONDS", 60, 1, MAX_SECONDS)
    steps = int(setting("STEPS", 5, 1, MAX_USERS))

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        step = int(elapsed // self.step_seconds) + 1
        if step > self.steps or elapsed > MAX_SECONDS:
            return None
        users = min(step * self.step_users, MAX_USERS)
        return users, float(self.step_users)
