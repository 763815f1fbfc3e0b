"""Live gauges of processes that died without being reaped by their supervisor."""

from __future__ import annotations

import os
import subprocess
import sys

from engine import metrics


def test_live_gauges_of_dead_processes_are_forgotten(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = int(dead.stdout)
    me = os.getpid()
    for name in (f"gauge_livesum_{gone}.db", f"gauge_livesum_{me}.db", f"counter_{gone}.db"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics.forget_dead_processes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"counter_{gone}.db",
        f"gauge_livesum_{me}.db",
    ]
