"""Spike: SPIKE_BASE users for SPIKE_CALM_SECONDS, SPIKE_PEAK users for
SPIKE_SECONDS, SPIKE_BASE again for SPIKE_CALM_SECONDS, then stop.

Defaults: 5 users 60 s, 100 users 30 s, 5 users 60 s (2.5 minutes): scale-up on the
spike, then the scale-down stabilisation window after it.
"""

from __future__ import annotations

from locust import LoadTestShape

from loadtests.shapes._bounds import MAX_SECONDS, MAX_USERS, setting


class SpikeShape(LoadTestShape):
    base = int(setting("SPIKE_BASE", 5, 1, MAX_USERS))
    peak = int(setting("SPIKE_PEAK", 100, 1, MAX_USERS))
    calm_seconds = setting("SPIKE_CALM_SECONDS", 60, 1, MAX_SECONDS / 3)
    spike_seconds = setting("SPIKE_SECONDS", 30, 1, MAX_SECONDS / 3)

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        if elapsed < self.calm_seconds:
            return self.base, float(self.base)
        if elapsed < self.calm_seconds + self.spike_seconds:
            return self.peak, float(self.peak)  # all at once: that is the spike
        if elapsed < 2 * self.calm_seconds + self.spike_seconds:
            return self.base, float(self.peak)
        return None
