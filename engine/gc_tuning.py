"""Interpreter settings for the long-running processes (API, supervisor, workers, mock).

Garbage collection: intake and the workers create millions of short-lived dicts and
tuples. With Python's defaults (700, 10, 10) full collections that walk every object ever
loaded ran all the time. Measured at 1,000,000 recipients (bench/RESULTS.md):

- ``INTAKE`` for the API: intake 117,000-171,000/s before, 224,000/s after (API RSS
  unchanged, ~108 MB);
- ``WORKER`` for the supervisor, the workers and the mock: end to end 25,600/s before,
  31,700/s after, worker RSS ~100 MB (with ``INTAKE``'s larger first generation the
  workers held 230-245 MB of garbage between collections).
"""

from __future__ import annotations

import gc

INTAKE = (50_000, 20, 100)
WORKER = (10_000, 10, 50)


def tune_gc(thresholds: tuple[int, int, int]) -> None:
    """Call once the process's modules are loaded."""
    gc.set_threshold(*thresholds)
    gc.freeze()  # what is loaded so far is never garbage: keep it out of every collection
